//! Per-payload reporting to the VO server, off the agent's main loop.
//!
//! Each payload gets one task that sends its status reports in order (running, heartbeats,
//! the final state), then builds and uploads its output archive, and tells the agent how that
//! went. The agent never waits on the network, so signals and helper events are handled at
//! once even when the server is slow. It never talks to the helper.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::client::ServerApi;
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
    /// A heartbeat round trip finished (another may be sent).
    HeartbeatDone { payload_id: String },
    /// The final report and upload are done. `upload` is `ok` or `error: ...` (None when
    /// there was nothing to upload).
    Finished {
        payload_id: String,
        upload: Option<String>,
    },
}

/// Starts the reporter for one payload; returns the queue to feed it.
pub fn spawn<S: ServerApi>(
    server: Arc<S>,
    payload_id: String,
    back: mpsc::UnboundedSender<Reported>,
) -> mpsc::UnboundedSender<ReportJob> {
    let (tx, mut rx) = mpsc::unbounded_channel::<ReportJob>();
    tokio::spawn(async move {
        while let Some(job) = rx.recv().await {
            match job {
                ReportJob::Status { report, heartbeat } => {
                    send_status(&*server, &payload_id, report, &back).await;
                    if heartbeat {
                        let _ = back.send(Reported::HeartbeatDone {
                            payload_id: payload_id.clone(),
                        });
                    }
                }
                ReportJob::Final { report, archive } => {
                    send_status(&*server, &payload_id, report, &back).await;
                    let upload = match archive {
                        Some(src) => Some(upload(&*server, &payload_id, src).await),
                        None => None,
                    };
                    let _ = back.send(Reported::Finished {
                        payload_id: payload_id.clone(),
                        upload,
                    });
                    return;
                }
            }
        }
    });
    tx
}

async fn send_status<S: ServerApi>(
    server: &S,
    payload_id: &str,
    report: StatusReport,
    back: &mpsc::UnboundedSender<Reported>,
) {
    let state = report.state;
    match server.report(payload_id.to_string(), report).await {
        Ok(ack) if !ack.commands.is_empty() => {
            let _ = back.send(Reported::Commands {
                payload_id: payload_id.to_string(),
                commands: ack.commands,
            });
        }
        Ok(_) => {}
        Err(e) => {
            tracing::error!(payload_id, state = ?state, error = %e, "status report to the VO server failed")
        }
    }
}

async fn upload<S: ServerApi>(server: &S, payload_id: &str, src: ArchiveSource) -> String {
    let built = {
        let src = src.clone();
        tokio::task::spawn_blocking(move || {
            build_archive(src.outputs_b64.as_deref(), &src.stdout, &src.stderr)
        })
        .await
    };
    let (bytes, notes) = match built {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => return format!("error: {e}"),
        Err(e) => return format!("error: archive task failed: {e}"),
    };
    for n in notes {
        tracing::warn!(payload_id, note = %n, "output archive");
    }
    match server.upload(payload_id.to_string(), bytes).await {
        Ok(()) => {
            if let Err(e) = std::fs::remove_dir_all(&src.dir) {
                tracing::warn!(payload_id, dir = %src.dir.display(), error = %e, "cannot remove the payload's work directory");
            }
            "ok".into()
        }
        Err(e) => {
            tracing::error!(payload_id, error = %e, dir = %src.dir.display(), "output upload failed; stdout and stderr stay in the work directory");
            format!("error: {e}")
        }
    }
}
