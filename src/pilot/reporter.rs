//! Per-payload reporting to the VO server, off the agent's main loop.
//!
//! Each payload gets one task that sends its status reports in order (running, heartbeats,
//! the final state), then uploads its output archive, and tells the agent how that went. The
//! final state and the archive go to the durable outbox first ([`super::outbox`]) and are
//! retried with backoff until they are delivered or the pilot leaves (the agent decides when);
//! a heartbeat that does not get through leaves its last word there too. The agent never
//! waits on the network, so signals and helper events are handled at once even when the
//! server is slow or down. It never talks to the helper.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::client::{ClientError, ServerApi};
use super::outbox::{Entry, Outbox};
use super::output::build_archive;
use crate::protocol::api::{OperatorCommand, StatusReport};
/// What the output archive is made of.
#[derive(Debug, Clone)]
pub struct ArchiveSource {
    /// The helper's outputs tar.gz (base64).
    pub outputs_b64: Option<String>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    /// Removed after a successful upload (the slot's disk is the VO's to keep clean).
    pub dir: PathBuf,
}

/// Work for a reporter task.
#[derive(Debug)]
pub enum ReportJob {
    /// A status report; `heartbeat` marks the periodic ones.
    Status {
        report: StatusReport,
        heartbeat: bool,
    },
    /// The final state, then the upload; the task ends after it.
    Final {
        report: StatusReport,
        archive: Option<ArchiveSource>,
    },
}

/// What reporter tasks tell the agent.
#[derive(Debug)]
pub enum Reported {
    /// Operator commands the server answered with.
    Commands {
        payload_id: String,
        commands: Vec<OperatorCommand>,
    },
    /// The server took a non-final report (it knows the payload runs).
    Acked { payload_id: String },
    /// A heartbeat round trip finished (another may be sent).
    HeartbeatDone { payload_id: String },
    /// The final state (and archive) is in the outbox: the pilot may leave without losing it.
    Stored { payload_id: String },
    /// The final report and upload are done. `upload` is `ok` or `error: ...` (None when
    /// there was nothing to upload).
    Finished {
        payload_id: String,
        upload: Option<String>,
    },
    /// An entry a gone pilot left in its outbox was sent (or refused for good).
    Adopted {
        entry: Box<Entry>,
        upload: Option<String>,
    },
    /// Every adopted entry was handled.
    AdoptedAll,
}

/// Retry schedule of the outbox: transient failures are retried at these intervals for as
/// long as the pilot stays (each attempt is itself the client's short retry series).
#[derive(Debug, Clone, Copy)]
pub struct Patience {
    pub first: Duration,
    pub max: Duration,
}

impl Default for Patience {
    fn default() -> Self {
        Patience {
            first: Duration::from_secs(1),
            max: Duration::from_secs(10),
        }
    }
}

/// A running reporter task: the queue that feeds it, and the handle that ends it when the
/// pilot leaves with its reports undelivered (they are in the outbox; the task must let go
/// of the outbox's lock so a later pilot can take it).
pub struct Reporter {
    pub tx: mpsc::UnboundedSender<ReportJob>,
    pub task: tokio::task::AbortHandle,
}

impl Reporter {
    pub fn send(&self, job: ReportJob) {
        let _ = self.tx.send(job);
    }
}

/// Starts the reporter for one payload.
pub fn spawn<S: ServerApi>(
    server: Arc<S>,
    outbox: Arc<Outbox>,
    patience: Patience,
    payload_id: String,
    back: mpsc::UnboundedSender<Reported>,
) -> Reporter {
    let (tx, mut rx) = mpsc::unbounded_channel::<ReportJob>();
    let task = tokio::spawn(async move {
        // A heartbeat's last word is in the outbox (removed when a later report gets through).
        let mut last_word = false;
        while let Some(job) = rx.recv().await {
            match job {
                ReportJob::Status { report, heartbeat } => {
                    let sent = send_status(&*server, &payload_id, report.clone(), &back).await;
                    if let Ok(()) = sent {
                        let _ = back.send(Reported::Acked {
                            payload_id: payload_id.clone(),
                        });
                        if last_word {
                            outbox.remove(&payload_id);
                            last_word = false;
                        }
                    } else if sent.is_err_and(|e| e.is_transient()) {
                        let entry = Entry {
                            payload_id: payload_id.clone(),
                            report,
                            archive: false,
                            dir: None,
                            written: crate::records::now_rfc3339(),
                        };
                        last_word = store(&outbox, entry).await;
                    }
                    if heartbeat {
                        let _ = back.send(Reported::HeartbeatDone {
                            payload_id: payload_id.clone(),
                        });
                    }
                }
                ReportJob::Final { report, archive } => {
                    let (entry, build_error) =
                        store_final(&outbox, &payload_id, report, archive).await;
                    let _ = back.send(Reported::Stored {
                        payload_id: payload_id.clone(),
                    });
                    let mut upload = deliver(&*server, &outbox, &entry, patience).await;
                    if let Some(e) = build_error {
                        upload = Some(e);
                    }
                    let _ = back.send(Reported::Finished {
                        payload_id: payload_id.clone(),
                        upload,
                    });
                    return;
                }
            }
        }
    });
    Reporter {
        tx,
        task: task.abort_handle(),
    }
}

/// Sends the entries of outboxes that gone pilots left, one after the other.
pub fn spawn_adopted<S: ServerApi>(
    server: Arc<S>,
    outboxes: Vec<Outbox>,
    adopter: String,
    patience: Patience,
    back: mpsc::UnboundedSender<Reported>,
) -> tokio::task::AbortHandle {
    let task = tokio::spawn(async move {
        for ob in outboxes {
            for entry in ob.entries() {
                let entry = if entry.is_final() {
                    entry
                } else {
                    super::outbox::last_word_to_lost(entry, &adopter)
                };
                let upload = deliver(&*server, &ob, &entry, patience).await;
                let _ = back.send(Reported::Adopted {
                    entry: Box::new(entry),
                    upload,
                });
            }
            ob.remove_if_empty();
        }
        let _ = back.send(Reported::AdoptedAll);
    });
    task.abort_handle()
}

/// Writes `entry` to the outbox off the async threads; false (logged) when it cannot.
async fn store(outbox: &Arc<Outbox>, entry: Entry) -> bool {
    let ob = outbox.clone();
    let id = entry.payload_id.clone();
    match tokio::task::spawn_blocking(move || ob.put(&entry)).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::error!(payload_id = %id, error = %e, "cannot write the outbox; this report lives in memory only");
            false
        }
        Err(e) => {
            tracing::error!(payload_id = %id, error = %e, "outbox task failed");
            false
        }
    }
}

/// Builds the archive and writes it and the final entry to the outbox. Returns the entry and,
/// when the archive could not be built, the error (the final state is still sent).
async fn store_final(
    outbox: &Arc<Outbox>,
    payload_id: &str,
    report: StatusReport,
    archive: Option<ArchiveSource>,
) -> (Entry, Option<String>) {
    let mut entry = Entry {
        payload_id: payload_id.to_string(),
        report,
        archive: false,
        dir: archive.as_ref().map(|a| a.dir.clone()),
        written: crate::records::now_rfc3339(),
    };
    let mut build_error = None;
    if let Some(src) = archive {
        let ob = outbox.clone();
        let id = payload_id.to_string();
        let built = tokio::task::spawn_blocking(move || {
            let (bytes, notes) =
                build_archive(src.outputs_b64.as_deref(), &src.stdout, &src.stderr)
                    .map_err(|e| format!("error: {e}"))?;
            ob.put_archive(&id, &bytes)
                .map_err(|e| format!("error: {e}"))?;
            Ok::<_, String>(notes)
        })
        .await
        .unwrap_or_else(|e| Err(format!("error: archive task failed: {e}")));
        match built {
            Ok(notes) => {
                for n in notes {
                    tracing::warn!(payload_id, note = %n, "output archive");
                }
                entry.archive = true;
            }
            Err(e) => {
                tracing::error!(payload_id, error = %e, "no output archive; stdout and stderr stay in the work directory");
                entry.dir = None;
                build_error = Some(e);
            }
        }
    }
    store(outbox, entry.clone()).await;
    (entry, build_error)
}

/// Sends one outbox entry: the report, then the archive, each retried while the failure is
/// transient; then forgets the entry and the payload's work directory. Returns the upload
/// outcome (`ok`, `error: ...`; None when there was no archive). A refusal other than 409 is
/// final: the entry is dropped and the archive and work directory are left for the operator.
async fn deliver<S: ServerApi>(
    server: &S,
    outbox: &Outbox,
    entry: &Entry,
    patience: Patience,
) -> Option<String> {
    let id = entry.payload_id.as_str();
    let state = entry.report.state;
    let report = retry(patience, id, "final report", || {
        server.report(id.to_string(), entry.report.clone())
    })
    .await;
    match report {
        Ok(_) => {}
        Err(ClientError::Refused {
            status: 409,
            message,
            ..
        }) => {
            // A final state is already there (cancelled, or our own earlier report): the
            // server keeps it; the outputs still belong to the payload.
            tracing::warn!(payload_id = id, state = ?state, %message, "VO server already has a final state for this payload")
        }
        Err(ClientError::BadAnswer { why, .. }) => {
            // A 2xx answer whose body the pilot could not read: the server took the report.
            tracing::warn!(payload_id = id, %why, "VO server took the final report with an unexpected answer")
        }
        Err(e) => {
            tracing::error!(payload_id = id, state = ?state, error = %e, archive = %outbox.archive_path(id).display(), "VO server refused the final report for good; the outputs stay on this node");
            outbox.remove_entry_only(id);
            return entry.archive.then(|| format!("error: {e}"));
        }
    }
    let upload = if entry.archive {
        let path = outbox.archive_path(id);
        let bytes = match tokio::fs::read(&path).await {
            Ok(b) => b,
            Err(e) => {
                let why = format!("error: cannot read {}: {e}", path.display());
                tracing::error!(payload_id = id, error = %why, "output archive missing from the outbox");
                outbox.remove(id);
                return Some(why);
            }
        };
        match retry(patience, id, "output upload", || {
            server.upload(id.to_string(), bytes.clone())
        })
        .await
        {
            Ok(()) => Some("ok".to_string()),
            Err(e) => {
                tracing::error!(payload_id = id, error = %e, archive = %path.display(), "VO server refused the output archive for good; it stays on this node");
                outbox.remove_entry_only(id);
                return Some(format!("error: {e}"));
            }
        }
    } else {
        None
    };
    outbox.remove(id);
    // Only a payload directory of this work dir is removed, whatever an entry names.
    let work_dir = outbox.dir().parent().and_then(|p| p.parent());
    if let Some(dir) = entry
        .dir
        .as_ref()
        .filter(|d| d.parent() == work_dir && d.file_name().and_then(|n| n.to_str()) == Some(id))
    {
        if let Err(e) = std::fs::remove_dir_all(dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(payload_id = id, dir = %dir.display(), error = %e, "cannot remove the payload's work directory");
            }
        }
    }
    upload
}

/// Calls `f` until it succeeds or fails for a reason a later attempt would not change.
async fn retry<T, F, Fut>(
    patience: Patience,
    id: &str,
    what: &str,
    mut f: F,
) -> Result<T, ClientError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, ClientError>>,
{
    let mut delay = patience.first;
    let mut attempt = 1u32;
    loop {
        match f().await {
            Err(e) if e.is_transient() => {
                tracing::warn!(payload_id = id, attempt, retry_in_ms = delay.as_millis() as u64, error = %e, "{what} not delivered; kept in the outbox, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(patience.max);
                attempt += 1;
            }
            other => return other,
        }
    }
}

/// Sends one non-final report.
async fn send_status<S: ServerApi>(
    server: &S,
    payload_id: &str,
    report: StatusReport,
    back: &mpsc::UnboundedSender<Reported>,
) -> Result<(), ClientError> {
    let state = report.state;
    match server.report(payload_id.to_string(), report).await {
        Ok(ack) => {
            if !ack.commands.is_empty() {
                let _ = back.send(Reported::Commands {
                    payload_id: payload_id.to_string(),
                    commands: ack.commands,
                });
            }
            Ok(())
        }
        Err(e) => {
            tracing::error!(payload_id, state = ?state, error = %e, "status report to the VO server failed");
            Err(e)
        }
    }
}
