//! The CI smoke run of the load tool: the baseline and the predict scenario
//! for a second each, against a real broker and replica, with no failed
//! request. The full run is `scripts/load`.

use std::path::Path;
use std::process::Command;

#[test]
fn slow_smoke_run_has_no_failed_requests() {
    let load = Path::new(env!("CARGO_BIN_EXE_load"));
    // nextest builds the workspace's binaries in one profile directory.
    let tributary = load.with_file_name("tributary");
    assert!(tributary.exists(), "{} is built with the workspace's binaries", tributary.display());
    let out = tempfile::tempdir().unwrap();
    let run = Command::new(load)
        .args(["run", "--smoke", "--out"])
        .arg(out.path())
        .arg("--tributary")
        .arg(&tributary)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(run.status.success(), "load run --smoke failed\n{stdout}\n{}", String::from_utf8_lossy(&run.stderr));
    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.path().join("report.json")).unwrap()).unwrap();
    let findings = report["findings"].as_array().unwrap();
    let measured = |scenario: &str, measure: &str| {
        findings
            .iter()
            .find(|f| f["scenario"] == scenario && f["measure"].as_str().unwrap().starts_with(measure))
            .map(|f| f["value"].as_f64().unwrap())
    };
    assert!(measured("baseline", "hello-world requests/s").unwrap() > 0.0, "{stdout}");
    assert!(measured("predict", "requests/s, as fast").unwrap() > 0.0, "{stdout}");
    assert_eq!(measured("predict", "failed requests"), Some(0.0), "{stdout}");
    assert!(out.path().join("report.md").exists());
}
