//! The report of one run: each finding next to its goal, stamped with the
//! date, the commit and the machine, written as JSON (every detail) and as
//! a Markdown table. A full run is also kept in `load/results/runs/`, from
//! which `history` renders the benchmark tables.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use serde::{Deserialize, Serialize};
use std::process::Command;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub scenario: String,
    /// What was measured, in words with its unit: "predict p99 (ms)".
    pub measure: String,
    pub value: f64,
    /// The goal in words ("<= 2"), if the scenario has one.
    pub goal: Option<String>,
    pub met: Option<bool>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Report {
    /// When the run started, UTC, to the minute: `2026-12-02T21:58Z`.
    #[serde(default)]
    pub date: String,
    /// The commit built, short, `-dirty` with uncommitted changes.
    #[serde(default)]
    pub commit: String,
    pub machine: String,
    pub command: String,
    pub findings: Vec<Finding>,
    /// Per scenario: the raw measurements behind its findings.
    pub details: BTreeMap<String, serde_json::Value>,
}

/// A goal a finding is held to.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    None,
    AtLeast(f64),
    AtMost(f64),
}

impl Report {
    pub fn new(command: String) -> Report {
        Report { date: now(), commit: commit(), machine: machine(), command, ..Report::default() }
    }

    pub fn add(&mut self, scenario: &str, measure: &str, value: f64, goal: Goal) {
        let (goal, met) = match goal {
            Goal::None => (None, None),
            Goal::AtLeast(g) => (Some(format!(">= {g}")), Some(value >= g)),
            Goal::AtMost(g) => (Some(format!("<= {g}")), Some(value <= g)),
        };
        println!(
            "{scenario:>14}  {measure:<52} {value:>12.3}  {}",
            goal.as_deref()
                .map(|g| format!("goal {g}: {}", if met == Some(true) { "met" } else { "MISSED" }))
                .unwrap_or_default()
        );
        self.findings.push(Finding { scenario: scenario.into(), measure: measure.into(), value, goal, met });
    }

    pub fn detail(&mut self, scenario: &str, value: impl Serialize) {
        self.details.insert(scenario.into(), serde_json::to_value(value).expect("serializable detail"));
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(
            md,
            "{}, commit {}. Machine: {}. Command: `{}`.\n",
            self.date, self.commit, self.machine, self.command
        );
        let _ = writeln!(md, "| scenario | measure | value | goal | met |");
        let _ = writeln!(md, "|---|---|---:|---|---|");
        for f in &self.findings {
            let met = match f.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |",
                f.scenario,
                f.measure,
                fmt(f.value),
                f.goal.as_deref().unwrap_or(""),
                met
            );
        }
        md
    }

    pub fn write(&self, dir: &Path) -> anyhow::Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("report.json"), serde_json::to_string_pretty(self)?)?;
        std::fs::write(dir.join("report.md"), self.markdown())?;
        Ok(())
    }

    /// Keeps this run in `runs` as `<date>_<commit>_<label>.json` (the
    /// label says which scenarios: `all`, or their names), for `history`.
    pub fn keep(&self, runs: &Path, label: &str) -> anyhow::Result<()> {
        let name = format!("{}_{}_{label}.json", self.date.replace(':', ""), self.commit);
        std::fs::create_dir_all(runs)?;
        std::fs::write(runs.join(name), serde_json::to_string_pretty(self)? + "\n")?;
        Ok(())
    }
}

/// Three significant digits, without exponent noise.
pub fn fmt(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    format!("{v:.digits$}")
}

/// The output of a command, trimmed; `None` if it cannot run or fails.
fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok().filter(|o| o.status.success())?;
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Now, UTC, to the minute.
fn now() -> String {
    output_of("date", &["-u", "+%FT%H:%MZ"]).unwrap_or_else(|| "unknown-date".into())
}

/// The commit the tool runs in, `-dirty` when the tree has changes outside
/// `load/results` (where runs are written).
fn commit() -> String {
    let Some(head) = output_of("git", &["rev-parse", "--short", "HEAD"]) else { return "unknown".into() };
    let changes = output_of("git", &["status", "--porcelain", "--", ".", ":!load/results"]).unwrap_or_default();
    if changes.is_empty() {
        head
    } else {
        format!("{head}-dirty")
    }
}

/// CPU model and count, and memory: what a reader needs to compare figures.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']))
        .unwrap_or("unknown CPU");
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb: u64 = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:")?.trim().trim_end_matches(" kB").parse().ok())
        .unwrap_or(0);
    format!("{cpus} x {model}, {} GiB", mem_kb / (1 << 20))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn goals_are_judged_and_tabled() {
        let mut r = Report::new("load run".into());
        r.add("predict", "p99 (ms)", 1.5, Goal::AtMost(2.0));
        r.add("train", "events/s", 1000.0, Goal::AtLeast(300000.0));
        r.add("swaps", "swaps/s", 19.7, Goal::None);
        assert_eq!(r.findings.iter().map(|f| f.met).collect::<Vec<_>>(), vec![Some(true), Some(false), None]);
        let md = r.markdown();
        assert!(md.contains("| predict | p99 (ms) | 1.50 | <= 2 | yes |"), "{md}");
        assert!(md.contains("| train | events/s | 1000 | >= 300000 | **no** |"), "{md}");
    }
}
