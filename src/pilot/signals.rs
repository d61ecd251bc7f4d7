//! Turns the batch system's and the operator's signals into agent [`Control`] requests.
//!
//! SIGTERM and SIGINT ask for a graceful stop (a second one kills payloads at once); SIGUSR1
//! and SIGUSR2 ask for a drain. Nothing else happens in signal context: tokio delivers the
//! signals to this task.

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;

use super::agent::Control;

/// Installs the handlers and forwards signals to `tx` until the agent drops the receiver.
pub fn forward(tx: mpsc::UnboundedSender<Control>) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut usr1 = signal(SignalKind::user_defined1())?;
    let mut usr2 = signal(SignalKind::user_defined2())?;
    tokio::spawn(async move {
        loop {
            let c = tokio::select! {
                _ = term.recv() => Control::Stop("SIGTERM".into()),
                _ = int.recv() => Control::Stop("SIGINT".into()),
                _ = usr1.recv() => Control::Drain("SIGUSR1".into()),
                _ = usr2.recv() => Control::Drain("SIGUSR2".into()),
            };
            if tx.send(c).is_err() {
                return;
            }
        }
    });
    Ok(())
}
