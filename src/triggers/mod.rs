//! Triggers: configured reactions to tag events ([`crate::stream::events`]). Each trigger
//! matches streams by a glob over `NAMESPACE/NAME` and either runs a command with the event as
//! JSON on its stdin or POSTs the JSON to an `http://` URL (no redirects followed). Attempts are retried with backoff; every outcome is logged and counted in
//! `imagestream_trigger_runs_total{trigger,outcome}`. A trigger never blocks the daemon or the
//! other triggers: each event is handled in its own task.

pub mod prepull;

use crate::stream::events::TagEvent;
use crate::stream::resolve::View;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::watch;

/// Attempts per event before a trigger gives up.
pub const ATTEMPTS: u32 = 3;
/// Delay before the first retry; doubled for each further one.
pub const RETRY_BASE: Duration = Duration::from_secs(1);
/// How long one run of a trigger command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// A trigger as written in the config file (`[[triggers]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TriggerConfig {
    /// Names the trigger in logs and metrics.
    pub name: String,
    /// Glob over `NAMESPACE/NAME` of the streams whose tag events run it (`team-a/*`).
    #[serde(default = "all_streams")]
    pub streams: String,
    /// Program and arguments; the event is written to its stdin as one JSON object.
    #[serde(default)]
    pub command: Vec<String>,
    /// Or: an `http://` URL the event is POSTed to (`application/json`); a 2xx answer is success.
    #[serde(default)]
    pub url: Option<String>,
}

/// How long a trigger's POST may take.
pub const POST_TIMEOUT: Duration = Duration::from_secs(10);

fn all_streams() -> String {
    "*".into()
}

impl TriggerConfig {
    /// Checks the glob and the command.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("a trigger needs a name".into());
        }
        glob::Pattern::new(&self.streams)
            .map_err(|e| format!("trigger {:?}: streams {:?}: {e}", self.name, self.streams))?;
        match (&self.url, self.command.first()) {
            (Some(_), Some(_)) => Err(format!(
                "trigger {:?}: give either command or url, not both",
                self.name
            )),
            (Some(url), None) => {
                let uri: http::Uri = url
                    .parse()
                    .map_err(|e| format!("trigger {:?}: url {url:?}: {e}", self.name))?;
                match uri.scheme_str() {
                    Some("http") if uri.host().is_some() => Ok(()),
                    _ => Err(format!(
                        "trigger {:?}: url {url:?}: only http:// URLs are supported (for https, use a command trigger with curl)",
                        self.name
                    )),
                }
            }
            (None, Some(p)) if p.starts_with('/') => Ok(()),
            _ => Err(format!(
                "trigger {:?}: needs a command starting with an absolute program path, or a url",
                self.name
            )),
        }
    }

    fn matches(&self, e: &TagEvent) -> bool {
        glob::Pattern::new(&self.streams)
            .map(|p| p.matches(&format!("{}/{}", e.namespace, e.stream)))
            .unwrap_or(false)
    }
}

fn count(trigger: &str, outcome: &str) {
    crate::metrics::metrics()
        .trigger_runs
        .get_or_create(&crate::metrics::TriggerLabels {
            trigger: trigger.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
}

async fn post(url: &str, json: &[u8]) -> Result<(), String> {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let req = http::Request::post(url)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
            json,
        )))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(POST_TIMEOUT, client.request(req))
        .await
        .map_err(|_| format!("timed out after {POST_TIMEOUT:?}"))?
        .map_err(|e| crate::audit::error_chain(&e))?;
    let status = resp.status();
    // Drain (bounded) so the connection can be reused; the body is not used.
    let _ = tokio::time::timeout(
        POST_TIMEOUT,
        http_body_util::Limited::new(resp.into_body(), 64 << 10).collect(),
    )
    .await;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("POST {url} answered {status}"))
    }
}

async fn run_once(t: &TriggerConfig, json: &[u8]) -> Result<(), String> {
    if let Some(url) = &t.url {
        return post(url, json).await;
    }
    let mut child = tokio::process::Command::new(&t.command[0])
        .args(&t.command[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", t.command[0]))?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(json).await;
        let _ = stdin.write_all(b"\n").await;
    }
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| format!("timed out after {COMMAND_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(crate::audit::cap(format!(
            "{}: {}",
            out.status,
            stderr.trim()
        )))
    }
}

async fn fire(t: TriggerConfig, e: TagEvent) {
    let json = serde_json::to_vec(&e).unwrap_or_default();
    for attempt in 1..=ATTEMPTS {
        match run_once(&t, &json).await {
            Ok(()) => {
                count(&t.name, "ok");
                tracing::info!(trigger = %t.name, tag = %e.tag, sequence = e.sequence, attempt, "trigger ran");
                return;
            }
            Err(err) if attempt < ATTEMPTS => {
                count(&t.name, "retry");
                tracing::warn!(trigger = %t.name, tag = %e.tag, attempt, error = %err, "trigger failed; retrying");
                tokio::time::sleep(RETRY_BASE * 2u32.pow(attempt - 1)).await;
            }
            Err(err) => {
                count(&t.name, "failed");
                tracing::error!(trigger = %t.name, tag = %e.tag, attempt, error = %err, "trigger failed; giving up");
            }
        }
    }
}

/// Runs `triggers` on every matching tag event until `shutdown`.
pub async fn run(view: View, triggers: Vec<TriggerConfig>, mut shutdown: watch::Receiver<bool>) {
    if triggers.is_empty() {
        return;
    }
    let mut events = view.events();
    loop {
        tokio::select! {
            e = events.recv() => match e {
                Ok(e) => {
                    for t in triggers.iter().filter(|t| t.matches(&e)) {
                        tokio::spawn(fire(t.clone(), e.clone()));
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::error!(missed = n, "triggers fell behind and missed tag events");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}
