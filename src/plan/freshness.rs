//! Whether each step and the image must be built, and why: what `kiln
//! plan` shows and what the build acts on, from the plan's keys, the store's
//! entries and the inputs of the recipe's last build.

use serde::Serialize;

use super::{Freshness, Plan, Reason, Step};
use crate::store::{RecipeState, Store};

/// Whether each step and the image must be built, and why, as `kiln plan`
/// and the build see it.
pub fn freshness(plan: &Plan, store: &Store, refresh: bool) -> (Vec<Freshness>, Freshness) {
    let state = store.recipe_state(&plan.recipe.image.name);
    let mut after_unlocked = false;
    let steps = plan
        .steps
        .iter()
        .map(|s| {
            let f = step_freshness(s, store, refresh, &state, after_unlocked);
            after_unlocked |= s.unlocked();
            f
        })
        .collect();
    let image = if after_unlocked && !refresh {
        Freshness::Build(Reason::ParentChanged)
    } else {
        image_freshness(plan, store, refresh, &state)
    };
    (steps, image)
}

pub fn step_freshness(
    step: &Step,
    store: &Store,
    refresh: bool,
    state: &RecipeState,
    after_unlocked: bool,
) -> Freshness {
    if refresh {
        Freshness::Build(Reason::Refresh)
    } else if step.unlocked() {
        Freshness::Build(Reason::Unlocked)
    } else if after_unlocked {
        // This key is provisional: it depends on how the step below resolves.
        Freshness::Build(Reason::ParentChanged)
    } else if store.has_layer(&step.key) {
        Freshness::Cached
    } else {
        Freshness::Build(super::reason(&step.inputs, state.steps.get(&*step.id())))
    }
}

pub fn image_freshness(
    plan: &Plan,
    store: &Store,
    refresh: bool,
    state: &RecipeState,
) -> Freshness {
    if refresh {
        Freshness::Build(Reason::Refresh)
    } else if store.has_image(&plan.image.key) {
        Freshness::Cached
    } else {
        Freshness::Build(super::image_reason(
            &plan.image.inputs,
            state.image.as_ref(),
        ))
    }
}

/// `kiln plan`: each step and the image, cached or to build, and why.
#[derive(Serialize)]
pub struct PlanReport {
    pub recipe: String,
    pub image: String,
    pub steps: Vec<PlanRow>,
}

#[derive(Serialize)]
pub struct PlanRow {
    pub stage: String,
    pub key: String,
    #[serde(flatten)]
    pub freshness: Freshness,
    /// With `--remote`: what the remote cache has for a step to build.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remote: Option<RemoteState>,
}

/// What the remote cache would do for a step the store lacks.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum RemoteState {
    /// It has a layer signed by a trusted key: the build pulls it.
    Pull {
        bytes: u64,
        signed_by: String,
    },
    Absent,
    /// It has one that does not verify: the build refuses it.
    Refused {
        why: String,
    },
    Unavailable,
}

impl PlanReport {
    /// Without a store nothing is cached (planning never creates one).
    pub fn new(plan: &Plan, store: Option<&Store>) -> PlanReport {
        let (steps, image) = match store {
            Some(store) => freshness(plan, store, false),
            None => (
                plan.steps
                    .iter()
                    .map(|_| Freshness::Build(Reason::NotInStore))
                    .collect(),
                Freshness::Build(Reason::NotInStore),
            ),
        };
        let mut rows: Vec<PlanRow> = plan
            .steps
            .iter()
            .zip(steps)
            .map(|(s, f)| PlanRow {
                stage: s.id().into(),
                key: s.key.hex(),
                freshness: f,
                remote: None,
            })
            .collect();
        rows.push(PlanRow {
            stage: "image".into(),
            key: plan.image.key.hex(),
            freshness: image,
            remote: None,
        });
        PlanReport {
            recipe: plan.recipe.path.display().to_string(),
            image: plan.recipe.image.name.clone(),
            steps: rows,
        }
    }

    pub fn text(&self) -> String {
        let rows: Vec<Vec<String>> = self
            .steps
            .iter()
            .map(|r| {
                let (state, why) = match (&r.freshness, &r.remote) {
                    (Freshness::Cached, _) => ("cached".to_owned(), String::new()),
                    (Freshness::Build(_), Some(RemoteState::Pull { bytes, signed_by })) => (
                        "pull".to_owned(),
                        format!(
                            "{} from the remote, signed by {signed_by}",
                            crate::store::gc::human(*bytes)
                        ),
                    ),
                    (Freshness::Build(reason), Some(RemoteState::Refused { why })) => (
                        "build".to_owned(),
                        format!("{reason}; the remote's layer is refused: {why}"),
                    ),
                    (Freshness::Build(reason), _) => ("build".to_owned(), reason.to_string()),
                };
                vec![r.stage.clone(), r.key[..12].to_owned(), state, why]
            })
            .collect();
        crate::ui::table(&["STAGE", "KEY", "STATE", "WHY"], &rows)
    }
}
