//! Headless Chromium (Debian's `chromium` package) driven over the DevTools protocol, for
//! the browser tests: one browser per test, in its own profile directory, one page attached
//! through the browser's websocket. Blocking on purpose: tests run it on a blocking thread
//! while the app serves on the runtime. Console errors and uncaught exceptions are collected
//! as they arrive.

use std::{
    io::{BufRead, BufReader},
    net::TcpStream,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use base64::Engine as _;
use serde_json::{Value, json};
use tungstenite::{Message, WebSocket};

/// How long any one DevTools call or wait may take before the test fails.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// The Chromium binary, or a failure that says how to install it.
fn chromium_binary() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "chromium not found on PATH: the browser tests need Debian's chromium \
                 package (apt-get install chromium; .ci/run installs it)"
            )
        })
}

/// A headless Chromium and the one page the test drives.
pub struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
    socket: WebSocket<TcpStream>,
    session: String,
    next_id: u64,
    loads: u64,
    /// Console errors, uncaught exceptions and error log entries, in order.
    pub errors: Vec<String>,
}

impl Browser {
    /// Starts Chromium with a `width` x `height` viewport and attaches to a blank page.
    pub fn launch(width: u32, height: u32) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let mut command = Command::new(chromium_binary());
        command.args([
            "--headless",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--remote-debugging-port=0",
            &format!("--window-size={width},{height}"),
        ]);
        command.arg(format!("--user-data-dir={}", profile.path().display()));
        // The sandbox cannot start as root (CI runs as root).
        // SAFETY: geteuid has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } == 0 {
            command.arg("--no-sandbox");
        }
        command.arg("about:blank");
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        let browser_url = devtools_url(&mut child);
        let mut browser = Browser::attach(child, profile, &browser_url);
        browser.call("Page.enable", json!({}));
        browser.call("Runtime.enable", json!({}));
        browser.call("Log.enable", json!({}));
        browser.set_viewport(width, height);
        browser
    }

    fn attach(child: Child, profile: tempfile::TempDir, browser_url: &str) -> Browser {
        let address = browser_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_owned();
        let stream = TcpStream::connect(&address).expect("connect to chromium's DevTools");
        stream.set_read_timeout(Some(CALL_TIMEOUT)).unwrap();
        let (socket, _) = tungstenite::client(browser_url, stream).expect("DevTools handshake");
        let mut browser = Browser {
            child,
            _profile: profile,
            socket,
            session: String::new(),
            next_id: 0,
            loads: 0,
            errors: Vec::new(),
        };
        let target = browser.call("Target.createTarget", json!({"url": "about:blank"}));
        let attached = browser.call(
            "Target.attachToTarget",
            json!({"targetId": target["targetId"], "flatten": true}),
        );
        browser.session = attached["sessionId"].as_str().unwrap().to_owned();
        browser
    }

    /// A phone-like (`mobile`, so the viewport meta applies) or desktop viewport.
    pub fn set_viewport(&mut self, width: u32, height: u32) {
        self.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600}),
        );
    }

    /// Sends one command (to the page once attached) and returns its result.
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let mut message = json!({"id": id, "method": method, "params": params});
        if !self.session.is_empty() {
            message["sessionId"] = json!(self.session);
        }
        self.socket
            .send(Message::text(message.to_string()))
            .unwrap_or_else(|error| panic!("{method}: {error}"));
        loop {
            let message = self.next_message();
            if message["id"] == id {
                if let Some(error) = message.get("error") {
                    panic!("{method} failed: {error}");
                }
                return message["result"].clone();
            }
        }
    }

    /// The next message, with events noted on the way.
    fn next_message(&mut self) -> Value {
        loop {
            let message = self
                .socket
                .read()
                .unwrap_or_else(|error| panic!("reading from DevTools: {error}"));
            let Message::Text(text) = message else {
                continue;
            };
            let value: Value = serde_json::from_str(text.as_str()).unwrap();
            self.note_event(&value);
            return value;
        }
    }

    fn note_event(&mut self, message: &Value) {
        let params = &message["params"];
        match message["method"].as_str() {
            Some("Page.loadEventFired") => self.loads += 1,
            Some("Runtime.consoleAPICalled")
                if matches!(params["type"].as_str(), Some("error" | "assert")) =>
            {
                self.errors.push(format!("console: {}", params["args"]));
            }
            Some("Runtime.exceptionThrown") => {
                self.errors
                    .push(format!("exception: {}", params["exceptionDetails"]));
            }
            Some("Log.entryAdded") if params["entry"]["level"] == "error" => {
                self.errors.push(format!("log: {}", params["entry"]));
            }
            _ => {}
        }
    }

    /// Runs `action` (which makes the page navigate) and waits for the new page's load.
    pub fn and_wait_for_load(&mut self, action: impl FnOnce(&mut Browser)) {
        let before = self.loads;
        action(self);
        let deadline = Instant::now() + CALL_TIMEOUT;
        while self.loads == before {
            assert!(Instant::now() < deadline, "the page did not load");
            self.next_message();
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.and_wait_for_load(|browser| {
            browser.call("Page.navigate", json!({"url": url}));
        });
    }

    /// Clicks the element `selector` names (a link or a form's button) and waits for the
    /// page it leads to.
    pub fn click(&mut self, selector: &str) {
        let script = format!(
            "(() => {{ const e = document.querySelector({}); if (!e) return false; e.click(); return true; }})()",
            json!(selector)
        );
        self.and_wait_for_load(|browser| {
            assert_eq!(browser.eval(&script), json!(true), "no element {selector}");
        });
    }

    /// The value of a JavaScript expression in the page.
    pub fn eval(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression} threw: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Waits until `expression` is true in the page.
    pub fn wait_until(&mut self, expression: &str) {
        let deadline = Instant::now() + CALL_TIMEOUT;
        while self.eval(expression) != json!(true) {
            assert!(Instant::now() < deadline, "still not true: {expression}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves the whole page (not only the viewport) as a PNG under `dir`, at the current
    /// viewport width; returns its path.
    pub fn screenshot(&mut self, dir: &Path, name: &str) -> PathBuf {
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        let png = base64::engine::general_purpose::STANDARD
            .decode(shot["data"].as_str().unwrap())
            .unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!("{name}.png"));
        std::fs::write(&path, png).unwrap();
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The browser's DevTools websocket, from the line Chromium prints at start.
fn devtools_url(child: &mut Child) -> String {
    let stderr = child.stderr.take().unwrap();
    let (found, url) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut sent = false;
        // Read to the end so that Chromium never blocks on a full pipe.
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(at) = line.find("ws://")
                && !sent
            {
                sent = found.send(line[at..].trim().to_owned()).is_ok();
            }
        }
    });
    url.recv_timeout(CALL_TIMEOUT)
        .expect("chromium printed its DevTools address")
}
