//! What a person sees: one spinner per running stage with its elapsed time
//! on a terminal, one plain line per stage otherwise, and tables.
//! Progress goes to stderr; results (tables, JSON) go to stdout.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};

pub struct Ui {
    tty: bool,
    quiet: bool,
    /// The recipe a stage belongs to, when several are built at once.
    recipe: Option<String>,
}

pub struct Stage {
    name: String,
    bar: Option<ProgressBar>,
    started: Instant,
    quiet: bool,
}

impl Ui {
    /// `quiet` (for `--json`) keeps stderr to errors and one-line notices.
    pub fn new(quiet: bool) -> Ui {
        Ui {
            tty: std::io::stderr().is_terminal(),
            quiet,
            recipe: None,
        }
    }

    /// The stages of one recipe of several built at once: each line names
    /// the recipe (`web: app`), and there are no spinners, which would
    /// overwrite one another.
    pub fn for_recipe(quiet: bool, recipe: &str) -> Ui {
        Ui {
            tty: false,
            quiet,
            recipe: Some(recipe.to_owned()),
        }
    }

    pub fn stage(&self, name: &str, what: &str) -> Stage {
        let name = &match &self.recipe {
            Some(recipe) => format!("{recipe}: {name}"),
            None => name.to_owned(),
        };
        let bar = if self.tty && !self.quiet {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner:.cyan} {prefix:<22} {msg} {elapsed:>4}")
                    .expect("static template")
                    .tick_chars("⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏ "),
            );
            bar.set_prefix(name.to_owned());
            bar.set_message(what.to_owned());
            bar.enable_steady_tick(Duration::from_millis(120));
            Some(bar)
        } else {
            if !self.quiet {
                eprintln!("• {name}: {what}…");
            }
            None
        };
        Stage {
            name: name.to_owned(),
            bar,
            started: Instant::now(),
            quiet: self.quiet,
        }
    }
}

impl Stage {
    /// Finish the stage with a status word; returns its seconds.
    pub fn done(self, status: &str) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        let line = format!("✓ {:<22} {status} in {secs:.1}s", self.name);
        self.finish(&line);
        secs
    }

    pub fn failed(self) -> f64 {
        let secs = self.started.elapsed().as_secs_f64();
        let line = format!("✗ {:<22} failed after {secs:.1}s", self.name);
        self.finish(&line);
        secs
    }

    fn finish(&self, line: &str) {
        match &self.bar {
            Some(bar) => {
                bar.finish_and_clear();
                eprintln!("{line}");
            }
            None if !self.quiet => eprintln!("{line}"),
            None => {}
        }
    }
}

/// A plain-text table with left-aligned columns.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn table_aligns_columns() {
        let t = super::table(
            &["a", "bb"],
            &[vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "a    bb\nxxx  y\nz\n");
    }
}
