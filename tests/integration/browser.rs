//! `/test/` in a real browser: headless Chromium against a real lab, asserting what a
//! visitor sees (the verdict, the timeline, the history chart, the controls, live mode
//! without console errors, no sideways scrolling on a 390 px phone) and saving screenshots
//! under the target directory (`screenshots/`) for people to look at.

use std::path::PathBuf;

use lagprobe::service::ProbeRequest;
use serde_json::json;

use crate::{
    chromium::Browser,
    harness::{TestApp, spawn_app},
};

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("screenshots")
}

/// Probes that fill the history before the page is looked at.
async fn probe_times(app: &TestApp, times: usize) {
    for _ in 0..times {
        app.service().probe(&ProbeRequest::default()).await.unwrap();
    }
}

/// Runs `drive` with a browser on a blocking thread while the app keeps serving.
async fn with_browser<T: Send + 'static>(
    width: u32,
    drive: impl FnOnce(&mut Browser) -> T + Send + 'static,
) -> T {
    tokio::task::spawn_blocking(move || drive(&mut Browser::launch(width, 900)))
        .await
        .expect("the browser test")
}

fn text_of(browser: &mut Browser, selector: &str) -> String {
    let script = format!(
        "document.querySelector({})?.textContent ?? ''",
        json!(selector)
    );
    browser.eval(&script).as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_verdict_timeline_history_and_controls() {
    let app = spawn_app(200).await;
    probe_times(&app, 6).await;
    // Short timeouts, so that the page stays quick while the link is cut; the forms must
    // carry them through their redirects.
    let url = app.http_url("/test/?visibility_timeout_ms=600&lsn_wait_timeout_ms=400");
    with_browser(1000, move |browser| {
        browser.navigate(&url);
        assert!(text_of(browser, "#verdict").starts_with("STALE"));
        let timeline = text_of(browser, "#timeline");
        for words in [
            "COMMIT acknowledged",
            "STALE read",
            "first hit",
            "lab delay 200 ms",
        ] {
            assert!(timeline.contains(words), "{words} in {timeline}");
        }
        let markers = browser.eval("document.querySelectorAll('#history-chart g.probe').length");
        assert!(markers.as_u64().unwrap() >= 7, "{markers}");
        assert!(text_of(browser, "#stale-ratio").contains("95% interval"));
        assert!(
            browser.eval("!!document.querySelector('#visibility-chart path.curve')") == json!(true)
        );
        assert_eq!(
            browser.eval("document.querySelectorAll('#strategies a').length"),
            json!(6)
        );
        assert!(text_of(browser, "#strategies [aria-current=page]").contains("replica"));
        browser.screenshot(&screenshots(), "test-page-desktop");

        browser.click("#strategies a[href*='lsn-wait']");
        assert!(text_of(browser, "#verdict").starts_with("CONSISTENT"));
        assert!(text_of(browser, "#strategies [aria-current=page]").contains("lsn-wait"));
        assert!(text_of(browser, "#timeline").contains("waited"));
        let again = browser.eval("document.querySelector('#again').getAttribute('href')");
        assert!(
            again
                .as_str()
                .unwrap()
                .contains("visibility_timeout_ms=600"),
            "{again}"
        );

        // Cut the link with the page's own button: lsn-wait falls back to the primary.
        browser.click("#cut-link");
        assert!(text_of(browser, "#lab-link").starts_with("CUT"));
        assert!(text_of(browser, "#timeline").contains("fell back to the primary"));
        assert!(
            browser
                .eval("location.search")
                .as_str()
                .unwrap()
                .contains("lsn_wait_timeout_ms=400")
        );
        browser.screenshot(&screenshots(), "test-page-link-cut");
        browser.click("#cut-link");
        assert!(!text_of(browser, "#lab-link").contains("CUT"));
    })
    .await;
    app.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_phone_sees_it_all_without_scrolling_sideways() {
    let app = spawn_app(200).await;
    probe_times(&app, 4).await;
    let url = app.http_url("/test/?visibility_timeout_ms=600");
    with_browser(390, move |browser| {
        browser.navigate(&url);
        let width = browser.eval("document.documentElement.scrollWidth");
        assert!(
            width.as_u64().unwrap() <= 390,
            "document width {width} at 390 px"
        );
        assert!(text_of(browser, "#verdict").starts_with("STALE"));
        browser.screenshot(&screenshots(), "test-page-390px");

        // Stop the replica with its button: the page reports a replica error, wrapped
        // to the phone's width, and does not claim the row is merely not there yet.
        browser.click("#servers form[action*='replica1/stop'] button");
        assert!(text_of(browser, "#servers").contains("stopped"));
        browser.navigate(&url);
        assert!(text_of(browser, "#verdict").starts_with("REPLICA ERROR"));
        assert!(!text_of(browser, "#probe").contains("row not there yet"));
        let width = browser.eval("document.documentElement.scrollWidth");
        assert!(width.as_u64().unwrap() <= 390, "error page width {width}");
        browser.screenshot(&screenshots(), "test-page-390px-replica-stopped");
        browser.click("#servers form[action*='replica1/start'] button");
        assert!(text_of(browser, "#servers").contains("running"));
    })
    .await;
    app.shutdown().await;
}

/// `PUT /api/delay` with `body`, from a blocking thread (the browser's), as another tab or
/// an operator's script would change the lab while a page watches.
fn put_delay(url: &str, body: serde_json::Value) {
    let response = tokio::runtime::Handle::current()
        .block_on(reqwest::Client::new().put(url).json(&body).send())
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
}

fn input_value(browser: &mut Browser, name: &str) -> serde_json::Value {
    browser.eval(&format!(
        "document.querySelector(\"#lab-controls input[name='{name}']\").value"
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_mode_streams_probes_and_redraws_while_the_delay_changes() {
    let app = spawn_app(0).await;
    // A short visibility timeout, so that probes keep streaming while the link is cut.
    let url = app.http_url("/test/?watch=1&interval_ms=150&visibility_timeout_ms=600");
    let delay_url = app.http_url("/api/delay");
    let (errors, markers) = with_browser(1000, move |browser| {
        browser.navigate(&url);
        browser.wait_until("Number(document.body.dataset.probesStreamed || 0) >= 3");
        assert_eq!(input_value(browser, "delay_ms"), json!("0"));
        let before = browser.eval("document.querySelectorAll('#history-chart g.probe').length");
        // The visitor is typing a jitter of their own: live mode must leave it alone.
        browser.eval(
            "(() => { const j = document.querySelector(\"#lab-controls input[name='jitter_ms']\"); \
             j.focus(); j.value = '7'; j.dispatchEvent(new Event('input')); })()",
        );
        // Turn the knob through the API while the page watches: the stream goes on, shows
        // the new delay, and the lab's form (outside the redrawn part) follows it.
        put_delay(&delay_url, json!({"delay_ms": 300, "jitter_ms": 40}));
        browser.wait_until("document.querySelector('#verdict')?.textContent.startsWith('STALE')");
        browser.wait_until(
            "(document.querySelector('#lab-link')?.textContent ?? '').startsWith('300 ms')",
        );
        assert_eq!(input_value(browser, "delay_ms"), json!("300"));
        assert_eq!(input_value(browser, "jitter_ms"), json!("7"));
        assert_eq!(
            browser.eval("document.activeElement.name"),
            json!("jitter_ms")
        );
        let after = browser.eval("document.querySelectorAll('#history-chart g.probe').length");
        assert!(after.as_u64() > before.as_u64(), "{before} then {after}");
        browser.screenshot(&screenshots(), "test-page-live");

        // A cut made elsewhere turns the page's button into the one that heals.
        put_delay(&delay_url, json!({"link_down": true}));
        browser.wait_until("document.querySelector('#cut-link').textContent === 'Heal the link'");
        assert_eq!(
            browser.eval("document.querySelector(\"#lab-controls input[name='link_down']\").value"),
            json!("false")
        );
        put_delay(&delay_url, json!({"link_down": false}));
        browser.wait_until("document.querySelector('#cut-link').textContent === 'Cut the link'");
        (browser.errors.clone(), after)
    })
    .await;
    assert!(
        errors.is_empty(),
        "console errors in live mode: {errors:#?}"
    );
    assert!(markers.as_u64().unwrap() >= 4, "{markers}");

    // Without JavaScript, the live page reloads itself instead.
    let url = app.http_url("/test/?watch=1");
    with_browser(1000, move |browser| {
        browser.call(
            "Emulation.setScriptExecutionDisabled",
            json!({"value": true}),
        );
        browser.navigate(&url);
        let refresh = browser.eval("document.querySelector('meta[http-equiv=refresh]')?.content");
        assert_eq!(refresh, json!("2"));
    })
    .await;
    app.shutdown().await;
}
