//! Several recipes built by one run (`kiln build A.toml B.toml …`): the
//! union of their steps is built once, independent work runs side by side,
//! at most `-j N` jobs at a time.
//!
//! Each recipe is built by a thread of its own that walks its chain of
//! steps bottom-up, as a single build does: a step starts only when the
//! step below it is in the store, so the recipes' chains together are the
//! union DAG of their steps (golden's base, security and network are the
//! trunk, web's and db's own layers two branches). Two things make that
//! walk a scheduler rather than three builds racing:
//!
//! - **Claims.** Before a thread brings a step into the store it claims the
//!   step's key. The first claim owns the step (checks the store, pulls or
//!   builds it); a later claim of the same key waits until the owner is
//!   done and then uses the entry, and its row says whose it was ("built for
//!   golden"). So a shared step is built (or pulled) once, and the summary
//!   knows it was shared, not merely found cached. An owner that fails
//!   fails its waiters too, naming the recipe: they do not build it again.
//!   A resolved step (one built from the archive and then pinned) is known
//!   under two keys, the unlocked one and the pinned one: its owner marks
//!   both done.
//! - **Jobs.** The heavy work (building or pulling a step, assembling an
//!   image, a smoke boot) holds one of N job tokens. A thread waiting for a
//!   claim holds none, so a waiting recipe never keeps another's work from
//!   running.
//!
//! A claim is taken before the store's per-key flock (a thread that waits
//! for a claim never takes that flock), and no thread waits for a claim
//! while it owns another or holds a token, so the waits cannot form a
//! cycle. The store's locks still order this run against other kiln
//! processes, as for a single build; steps that resolve against the archive
//! also take turns on the store's apt caches, as two kiln runs do.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Result};

use super::Status;

/// How often a wait looks at Ctrl-C.
const POLL: Duration = Duration::from_millis(200);

/// What the owner of a step did with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Done {
    /// The recipe (image name) whose thread did it.
    pub by: String,
    pub status: Status,
}

impl Done {
    /// The reason of a waiter's row: `built for golden in this run`.
    pub fn reason(&self) -> String {
        let what = match self.status {
            Status::Cached => "found in the store",
            status => status.as_str(),
        };
        format!("{what} for {} in this run", self.by)
    }
}

#[derive(Debug)]
enum Entry {
    Running,
    Done(Done),
    Failed { by: String },
}

/// The outcome of a claim.
pub enum Claim<'a, K: Eq + Hash + Clone> {
    /// This thread does the step and must [`Owner::finish`] it.
    Mine(Owner<'a, K>),
    /// Another thread did it in this run.
    Done(Done),
}

/// The claims and job tokens of one run.
pub struct Shared<K: Eq + Hash + Clone> {
    claims: Mutex<HashMap<K, Entry>>,
    changed: Condvar,
    free_jobs: Mutex<usize>,
    freed: Condvar,
    /// Serialises writing lock files: recipes that extend one share its lock.
    pub lock_files: Mutex<()>,
}

impl<K: Eq + Hash + Clone> Shared<K> {
    pub fn new(jobs: usize) -> Shared<K> {
        Shared {
            claims: Mutex::new(HashMap::new()),
            changed: Condvar::new(),
            free_jobs: Mutex::new(jobs.max(1)),
            freed: Condvar::new(),
            lock_files: Mutex::new(()),
        }
    }

    fn claims(&self) -> MutexGuard<'_, HashMap<K, Entry>> {
        self.claims.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claim `key` for `recipe`: the step is this thread's to do, or was
    /// done by another (after waiting for it, if it is running). An error
    /// when its owner failed, or on Ctrl-C.
    pub fn claim(&self, key: &K, what: &str, recipe: &str) -> Result<Claim<'_, K>> {
        let mut claims = self.claims();
        loop {
            match claims.get(key) {
                None => {
                    claims.insert(key.clone(), Entry::Running);
                    return Ok(Claim::Mine(Owner {
                        shared: self,
                        key: key.clone(),
                        by: recipe.to_owned(),
                        finished: false,
                    }));
                }
                Some(Entry::Done(done)) => return Ok(Claim::Done(done.clone())),
                Some(Entry::Failed { by }) => bail!(
                    "step {what} was not built: it failed in the build of {by} (see its error)"
                ),
                Some(Entry::Running) => {
                    crate::cmd::check_interrupt()?;
                    claims = self
                        .changed
                        .wait_timeout(claims, POLL)
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            }
        }
    }

    /// One of the run's job tokens, waiting for one to be free.
    pub fn job(&self) -> Result<Job<'_, K>> {
        let mut free = self.free_jobs.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            crate::cmd::check_interrupt()?;
            free = self
                .freed
                .wait_timeout(free, POLL)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *free -= 1;
        Ok(Job { shared: self })
    }
}

/// A claimed step: done or failed when this is finished or dropped.
pub struct Owner<'a, K: Eq + Hash + Clone> {
    shared: &'a Shared<K>,
    key: K,
    by: String,
    finished: bool,
}

impl<K: Eq + Hash + Clone> Owner<'_, K> {
    /// The step is in the store: under its key and under `also` (the
    /// pinned key of a step that was resolved).
    pub fn finish(mut self, status: Status, also: Option<&K>) {
        let done = Done {
            by: self.by.clone(),
            status,
        };
        let mut claims = self.shared.claims();
        if let Some(other) = also {
            claims
                .entry(other.clone())
                .or_insert_with(|| Entry::Done(done.clone()));
        }
        claims.insert(self.key.clone(), Entry::Done(done));
        self.finished = true;
        drop(claims);
        self.shared.changed.notify_all();
    }
}

impl<K: Eq + Hash + Clone> Drop for Owner<'_, K> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let by = self.by.clone();
        self.shared
            .claims()
            .insert(self.key.clone(), Entry::Failed { by });
        self.shared.changed.notify_all();
    }
}

/// A job token, given back when dropped.
pub struct Job<'a, K: Eq + Hash + Clone> {
    shared: &'a Shared<K>,
}

impl<K: Eq + Hash + Clone> Drop for Job<'_, K> {
    fn drop(&mut self) {
        *self
            .shared
            .free_jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner()) += 1;
        self.shared.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Three "recipes" over chains of step names, each bringing its steps
    /// in bottom-up as a recipe's thread does; `build` is the work of one
    /// step (an error fails it). Returns each recipe's rows: (step, whose).
    fn run(
        chains: &[(&str, &[&'static str])],
        jobs: usize,
        build: impl Fn(&str) -> Result<()> + Sync,
    ) -> Vec<Result<Vec<(String, String)>>> {
        let shared = Shared::<&'static str>::new(jobs);
        std::thread::scope(|scope| {
            let threads: Vec<_> = chains
                .iter()
                .map(|(recipe, steps)| {
                    let (shared, build) = (&shared, &build);
                    scope.spawn(move || {
                        let mut rows = Vec::new();
                        for step in *steps {
                            match shared.claim(step, step, recipe)? {
                                Claim::Mine(owner) => {
                                    let _job = shared.job()?;
                                    build(step)?;
                                    owner.finish(Status::Built, None);
                                    rows.push((step.to_string(), recipe.to_string()));
                                }
                                Claim::Done(done) => rows.push((step.to_string(), done.by)),
                            }
                        }
                        Ok(rows)
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().unwrap()).collect()
        })
    }

    const FLEET: [(&str, &[&str]); 3] = [
        ("golden", &["base", "security", "network"]),
        ("web", &["base", "security", "network", "app"]),
        ("db", &["base", "security", "network", "db"]),
    ];

    #[test]
    fn a_shared_step_is_built_once_and_every_recipe_gets_it() {
        let built = Mutex::new(Vec::new());
        let results = run(&FLEET, 2, |step| {
            built.lock().unwrap().push(step.to_owned());
            std::thread::sleep(Duration::from_millis(20));
            Ok(())
        });
        let mut built = built.into_inner().unwrap();
        built.sort();
        assert_eq!(built, ["app", "base", "db", "network", "security"]);
        for ((recipe, steps), result) in FLEET.iter().zip(results) {
            let rows = result.unwrap();
            let names: Vec<&str> = rows.iter().map(|(s, _)| s.as_str()).collect();
            assert_eq!(names, *steps, "{recipe} brings its steps in, in order");
        }
    }

    #[test]
    fn a_step_starts_only_after_the_step_below_it_is_done() {
        let done = Mutex::new(Vec::<String>::new());
        let results = run(&FLEET, 3, |step| {
            let below = match step {
                "security" => Some("base"),
                "network" => Some("security"),
                "app" | "db" => Some("network"),
                _ => None,
            };
            let finished = done.lock().unwrap().clone();
            if let Some(below) = below {
                assert!(finished.iter().any(|s| s == below), "{step} before {below}");
            }
            done.lock().unwrap().push(step.to_owned());
            Ok(())
        });
        assert!(results.iter().all(Result::is_ok));
    }

    #[test]
    fn no_more_than_n_jobs_run_at_once_and_independent_ones_overlap() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let chains: [(&str, &[&str]); 4] = [
            ("a", &["a1"]),
            ("b", &["b1"]),
            ("c", &["c1"]),
            ("d", &["d1"]),
        ];
        run(&chains, 2, |_| {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(50));
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        });
        assert_eq!(most.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_failed_shared_step_fails_its_waiters_naming_the_recipe_and_spares_the_rest() {
        let attempts = Arc::new(AtomicUsize::new(0));
        let chains: [(&str, &[&str]); 3] = [
            ("golden", &["base", "security"]),
            ("web", &["base", "security", "app"]),
            ("other", &["base", "other"]),
        ];
        let results = run(&chains, 3, |step| {
            if step == "security" {
                attempts.fetch_add(1, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(30));
                bail!("apt failed");
            }
            Ok(())
        });
        assert_eq!(attempts.load(Ordering::SeqCst), 1, "security is tried once");
        let errors: Vec<String> = results[..2]
            .iter()
            .map(|r| format!("{:#}", r.as_ref().unwrap_err()))
            .collect();
        assert!(
            errors.iter().any(|e| e == "apt failed"),
            "its owner sees the failure itself: {errors:?}"
        );
        assert!(
            errors
                .iter()
                .any(|e| e.contains("step security was not built: it failed in the build of")),
            "its waiter is told whose build failed: {errors:?}"
        );
        let other = results[2].as_ref().unwrap();
        assert_eq!(other.len(), 2, "a recipe that does not need it finishes");
    }

    #[test]
    fn a_resolved_step_is_done_under_its_pinned_key_too() {
        let shared = Shared::<&str>::new(1);
        let Claim::Mine(owner) = shared.claim(&"unlocked", "base", "golden").unwrap() else {
            panic!("the first claim owns the step");
        };
        owner.finish(Status::Built, Some(&"pinned"));
        for key in ["unlocked", "pinned"] {
            match shared.claim(&key, "base", "web").unwrap() {
                Claim::Done(done) => assert_eq!(
                    done,
                    Done {
                        by: "golden".into(),
                        status: Status::Built
                    }
                ),
                Claim::Mine(_) => panic!("{key} was done by golden"),
            }
        }
        assert_eq!(
            Done {
                by: "golden".into(),
                status: Status::Pulled
            }
            .reason(),
            "pulled for golden in this run"
        );
    }
}
