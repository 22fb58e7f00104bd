//! A real replica's HTTP-only paths: events posted to `/v1/events` reach
//! Kafka and are learned once each; the status page, driven in headless
//! Chromium through ChromeDriver (Debian's `chromium` and `chromium-driver`,
//! which scripts/setup installs), draws every chart with data.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use tributary::config::ModelKind;

use crate::helpers::{procs, try_wait_for, wait_for, watermarks, Cluster};

#[test]
fn posted_events_are_produced_and_learned_once_each() {
    let cluster = Cluster::new("ingest", ModelKind::Logistic);
    let r = cluster.spawn("r0");
    r.wait_ready();
    let mut synthetic = tributary::synthetic::Synthetic::new(&cluster.config.model, 3);
    let mut landed: BTreeSet<(i64, i64)> = BTreeSet::new();
    for batch in 0..3 {
        let events: Vec<Value> = (0..200).map(|_| serde_json::from_str(&synthetic.event(now_ms())).unwrap()).collect();
        let (status, v) = r.post("/v1/events", None, &json!({ "events": events }).to_string());
        assert_eq!(status, 202, "batch {batch}: {v}");
        let results = v["results"].as_array().unwrap();
        assert_eq!(results.len(), 200);
        for x in results {
            landed.insert((x["partition"].as_i64().unwrap(), x["offset"].as_i64().unwrap()));
        }
    }
    assert_eq!(landed.len(), 600, "every event at its own partition and offset");
    let info = r.wait_learned(600, Duration::from_secs(90));
    // The watermarks are exactly one past the last offset the API reported.
    let mut ends: BTreeMap<String, u64> = BTreeMap::new();
    for (p, o) in &landed {
        let end = ends.entry(p.to_string()).or_default();
        *end = (*end).max(*o as u64 + 1);
    }
    let learned: BTreeMap<String, u64> = watermarks(&info).into_iter().filter(|(_, v)| *v > 0).collect();
    assert_eq!(learned, ends);
    let text = r.metrics();
    assert_eq!(text.value("tributary_events_ingested_total", r#"result="produced""#), 600.0, "{text:?}");
}

#[test]
fn status_page_draws_every_chart_with_data_in_chromium() {
    let cluster = Cluster::new("status_page", ModelKind::Logistic);
    let r = cluster.spawn("r0");
    r.wait_ready();
    let browser = Browser::start(cluster.dir.path());
    let streaming = AtomicBool::new(true);
    std::thread::scope(|s| {
        // A live stream while the page is open: 100 events every 200 ms.
        s.spawn(|| {
            for seed in 100.. {
                if !streaming.load(Ordering::Relaxed) {
                    break;
                }
                cluster.produce(100, seed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check_status_page(&browser, &r)));
        streaming.store(false, Ordering::Relaxed);
        if let Err(panic) = result {
            std::panic::resume_unwind(panic);
        }
    });
}

fn check_status_page(browser: &Browser, r: &crate::helpers::Replica) {
    browser.open(&format!("http://{}/", r.http));
    let charts = crate::helpers::STATUS_SERIES;
    // The page polls every 2 s and the replica samples every second: wait
    // until every chart has drawn at least three points.
    let read = || {
        browser.eval(
            "return Object.fromEntries([...document.querySelectorAll('svg.chart')]
               .map(s => [s.id.slice(6), [Number(s.dataset.points), s.querySelector('polyline').getAttribute('points')]]))",
        )
    };
    let mut last = Value::Null;
    let drawn = try_wait_for("every chart drawn with data", Duration::from_secs(45), || {
        last = read();
        charts.iter().all(|c| last[c][0].as_u64().unwrap_or(0) >= 3).then(|| last.clone())
    })
    .unwrap_or_else(|e| panic!("{e}: {last}"));
    for c in charts {
        // Drawn means coordinates: "x,y x,y ...", one pair per point.
        let polyline = drawn[c][1].as_str().unwrap();
        assert_eq!(polyline.split(' ').count() as u64, drawn[c][0].as_u64().unwrap(), "{c}: {polyline}");
        assert!(polyline.split([' ', ',']).all(|n| n.parse::<f64>().is_ok_and(f64::is_finite)), "{c}: {polyline}");
    }
    let header = || {
        browser.eval("return ['replica', 'ready', 'now-model_version', 'now-progressive_logloss'].map(id => document.getElementById(id).textContent)")
    };
    let first = header();
    assert_eq!((first[0].as_str(), first[1].as_str()), (Some("r0"), Some("ready")), "{first}");
    let loss: f64 = first[3].as_str().unwrap().parse().unwrap();
    assert!(loss > 0.0 && loss < 1.0, "{first}");
    // Live: the shown version moves on while events flow.
    let version = |v: &Value| v[2].as_str().unwrap().replace(',', "").parse::<i64>().unwrap();
    wait_for("the page to show a newer model version", Duration::from_secs(20), || {
        (version(&header()) > version(&first)).then_some(())
    });
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Headless Chromium behind ChromeDriver, spoken to over W3C WebDriver.
struct Browser {
    driver: Child,
    base: String,
    session: String,
}

impl Browser {
    fn start(dir: &std::path::Path) -> Browser {
        let port = procs::free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; scripts/setup installs it)");
        let http = procs::http();
        let base = format!("http://127.0.0.1:{port}");
        wait_for("chromedriver to listen", Duration::from_secs(20), || {
            let status: Value = http.get(format!("{base}/status")).send().ok()?.json().ok()?;
            status["value"]["ready"].as_bool().filter(|r| *r)
        });
        // The flags keep Chromium off the network it would otherwise call
        // home on (closed here) and out of the machine's profile.
        let profile = dir.join("chromium-profile");
        let args = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.display()),
        ];
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args},
        }}});
        let created: Value = http.post(format!("{base}/session")).json(&capabilities).send().unwrap().json().unwrap();
        let session =
            created["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no session: {created}")).to_string();
        Browser { driver, base, session }
    }

    fn command(&self, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}/{path}", self.base, self.session);
        let answer: Value = procs::http().post(url).json(&body).send().unwrap().json().unwrap();
        assert!(answer["value"]["error"].is_null(), "webdriver {path}: {answer}");
        answer["value"].clone()
    }

    fn open(&self, url: &str) {
        self.command("url", json!({ "url": url }));
    }

    /// Runs `script` (a function body) in the page; its return value.
    fn eval(&self, script: &str) -> Value {
        self.command("execute/sync", json!({ "script": script, "args": [] }))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = procs::http().delete(format!("{}/session/{}", self.base, self.session)).send();
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}
