//! Starts the server: loads TLS material, the signing key, the store and the request log,
//! then runs the TLS accept loop. Each connection must present a client certificate from the
//! configured CA (the handshake fails otherwise); its subject DN is read and classified
//! (portal, robot, pilot, ...) once per connection and attached to every request with the
//! client's address and port ([`PeerDn`], [`ConnInfo`]). HTTP/1.1 and HTTP/2 (ALPN) with
//! keep-alive. Stops accepting on the shutdown signal, lets open connections finish their
//! requests, then writes what the request log still holds and anchors its chain head.

use std::collections::HashSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use super::api::{self, AppState, PeerDn};
use super::config::{ConfigError, ServerConfig};
use super::portal::gate::{ConnInfo, Controls};
use super::portal::identity::Identities;
use super::portal::ratelimit::RateLimiter;
use super::portal::requestlog::RequestLog;
use super::store::{Store, StoreError, SweepRules, Swept};
use crate::protocol::envelope::KeyError;
use crate::protocol::VoSigningKey;
use crate::tls::TlsError;

/// How long a client may take for the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long open connections get to finish after the shutdown signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// The sweeper looks for payloads whose pilot went away at most this far apart (more often
/// with a shorter heartbeat: every heartbeat interval).
const SWEEP_INTERVAL_MAX: Duration = Duration::from_secs(30);
/// How often the request log's chain head goes to syslog (as the helper's audit log).
const ANCHOR_INTERVAL: Duration = Duration::from_secs(3600);

/// Why the server could not start (or stopped with an error).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("signing_key: {0}")]
    Key(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen on {addr}: {source}; choose a free address in `listen`")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("request_log: {0}; fix [request_log] path in server.toml (its directory must exist and be writable by the server's account)")]
    RequestLog(#[from] crate::records::RecordError),
    #[error("cannot listen on {addr} for metrics: {source}; choose a free address in `metrics_listen` or remove it")]
    BindMetrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// Everything `serve` needs, loaded and checked before the socket is opened.
pub struct Prepared {
    state: Arc<AppState>,
    acceptor: TlsAcceptor,
    listen: SocketAddr,
    missed_heartbeats: u32,
    metrics_listen: Option<SocketAddr>,
}

/// Loads and checks the configuration's files, opens the database, seeds members.
pub fn prepare(cfg: &ServerConfig) -> Result<Prepared, ServeError> {
    cfg.check_files()?;
    let tls = crate::tls::server_config(&cfg.cert, &cfg.key, &cfg.ca)?;
    let key = VoSigningKey::from_pem_file(&cfg.signing_key)?;
    let mut store = Store::open_with(&cfg.data_dir, &cfg.database)?;
    store.set_requeue_limit(cfg.max_requeues);
    let store = Arc::new(store);
    let seeded = store.seed_members(&cfg.vo, &cfg.members, chrono::Utc::now())?;
    if seeded > 0 {
        // A seed is an active member with no registration data, no accepted AUP and no
        // approval on record: fine for a demo or a test VO, not what reference 002 asks of
        // a real one.
        tracing::warn!(
            count = seeded,
            config = %cfg.path.display(),
            "members added to the registry from [[member]] without registration data, AUP acceptance or an approval record; register real members with `mupilot-server member add` or the registration API (docs/vo-operator.md section 4)"
        );
    }
    if cfg.pilot_dns.is_empty() {
        tracing::warn!(config = %cfg.path.display(), "pilot_dns is empty: no pilot can fetch work");
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let issuer = format!("mupilot-server@{host}");
    let p = &cfg.portal;
    let portal = Controls {
        identities: Identities::new(&cfg.vo, p, &cfg.pilot_dns, &cfg.operator_dns),
        limiter: RateLimiter::new(),
        log: RequestLog::open(&p.request_log, p.request_log_retention, &host)?,
        server: Arc::from(issuer.as_str()),
    };
    let state = AppState {
        store,
        key,
        vo: cfg.vo.clone(),
        pilot_dns: cfg.pilot_dns.iter().cloned().collect::<HashSet<_>>(),
        envelope_lifetime: chrono::Duration::seconds(cfg.envelope_lifetime_seconds as i64),
        retention: chrono::Duration::seconds(cfg.retention_seconds as i64),
        record_retention: chrono::Duration::days(i64::from(cfg.record_retention_days)),
        issuer,
        limits: cfg.limits,
        heartbeat_seconds: cfg.heartbeat_seconds,
        worker_proxy: chrono::Duration::seconds(cfg.worker_proxy_seconds as i64),
        metrics: Arc::new(super::metrics::Metrics::new()),
        portal,
        registry: Arc::new(super::membership::Registry::new(&cfg.vo, &cfg.membership)),
    };
    Ok(Prepared {
        state: Arc::new(state),
        acceptor: TlsAcceptor::from(tls),
        listen: cfg.listen,
        missed_heartbeats: cfg.missed_heartbeats,
        metrics_listen: cfg.metrics_listen,
    })
}

/// Binds, announces the address on stdout (`listening on https://ADDR`), and serves until
/// `shutdown` completes.
pub async fn serve(p: Prepared, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let listener = TcpListener::bind(p.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: p.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: p.listen,
        source,
    })?;
    let metrics_listener = match p.metrics_listen {
        None => None,
        Some(m) => {
            let bind_err = |source| ServeError::BindMetrics { addr: m, source };
            let l = TcpListener::bind(m).await.map_err(bind_err)?;
            let bound = l.local_addr().map_err(bind_err)?;
            Some((l, bound))
        }
    };
    // Tests and scripts read this line to learn the port when listen ends in :0.
    // A closed stdout must not stop the server (println! would panic).
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "listening on https://{addr}");
    if let Some((_, m)) = &metrics_listener {
        let _ = writeln!(std::io::stdout(), "metrics on http://{m}/metrics");
    }
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, vo = %p.state.vo, "mupilot-server listening");
    let (metrics_stop_tx, mut metrics_stop_rx) = tokio::sync::watch::channel(false);
    let metrics_task = metrics_listener.map(|(l, m)| {
        tracing::info!(addr = %m, "metrics served on plain HTTP");
        let stop = async move {
            let _ = metrics_stop_rx.changed().await;
        };
        tokio::spawn(super::metrics::serve(
            l,
            p.state.metrics.clone(),
            p.state.store.clone(),
            stop,
        ))
    });

    let sweeper = tokio::spawn(sweep_loop(p.state.clone(), p.missed_heartbeats));
    let retention = tokio::spawn(retention_loop(p.state.clone()));
    let anchors = tokio::spawn(anchor_loop(p.state.clone()));
    let purge = tokio::spawn(membership_purge_loop(p.state.clone()));
    let router = api::router(p.state.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => {
                let (tcp, remote) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let state = p.state.clone();
                conns.spawn(connection(tcp, remote, p.acceptor.clone(), router.clone(), state, stop_rx.clone()));
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    tracing::info!(open = conns.len(), "shutting down: no new connections");
    sweeper.abort();
    retention.abort();
    anchors.abort();
    purge.abort();
    let _ = metrics_stop_tx.send(true);
    if let Some(t) = metrics_task {
        // A scrape takes milliseconds; never let one hold up the shutdown.
        if tokio::time::timeout(Duration::from_secs(2), t)
            .await
            .is_err()
        {
            tracing::warn!("metrics listener did not stop in time");
        }
    }
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = conns.len(),
            "connections did not finish in time; closing them"
        );
        conns.shutdown().await;
    }
    // Every answered request is recorded; what waits for a full disk is written now or
    // logged whole, and the head goes to syslog.
    let state = p.state.clone();
    let _ = tokio::task::spawn_blocking(move || {
        state.portal.log.finish();
        state.portal.log.anchor();
    })
    .await;
    Ok(())
}

/// Sends the request log's chain head to syslog every [`ANCHOR_INTERVAL`].
async fn anchor_loop(state: Arc<AppState>) {
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::now() + ANCHOR_INTERVAL,
        ANCHOR_INTERVAL,
    );
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let state = state.clone();
        let _ = tokio::task::spawn_blocking(move || state.portal.log.anchor()).await;
    }
}

/// Requeues payloads matched to pilots that never started them and marks the running
/// payloads of silent pilots lost (after `missed` heartbeats), so nothing waits forever on a
/// pilot that died. The first sweep comes only after the silence horizon: a server that was
/// itself down heard no heartbeats, and pilots need that long to get their outboxes through.
async fn sweep_loop(state: Arc<AppState>, missed: u32) {
    let hb = state.heartbeat_seconds.max(1);
    let silence_secs = hb.saturating_mul(u64::from(missed));
    let horizon = Duration::from_secs(silence_secs);
    let period = Duration::from_secs(hb).min(SWEEP_INTERVAL_MAX);
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + horizon, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let silence = format!("{silence_secs} s ({missed} missed heartbeats of {hb} s)");
    loop {
        tick.tick().await;
        let store = state.store.clone();
        let matched_horizon =
            state.envelope_lifetime + chrono::Duration::seconds(api::REQUEUE_MARGIN_SECONDS);
        let silence = silence.clone();
        let res = tokio::task::spawn_blocking(move || {
            let now = chrono::Utc::now();
            let rules = SweepRules {
                matched_before: now - matched_horizon,
                silent_before: now - chrono::Duration::seconds(silence_secs as i64),
                silence,
            };
            store.sweep(&rules, now)
        })
        .await;
        match res {
            Ok(Ok(s)) if s == Swept::default() => {}
            Ok(Ok(s)) => {
                tracing::warn!(
                    requeued = s.requeued,
                    failed = s.failed,
                    lost = s.lost,
                    "sweeper recovered payloads of silent pilots"
                )
            }
            Ok(Err(e)) => tracing::error!(error = %e, "sweeper failed"),
            Err(e) => tracing::error!(error = %e, "sweeper task failed"),
        }
    }
}

/// Deletes the registry data of memberships ended longer ago than the membership retention
/// period (reference 002: personal data no longer than a year), then the records of payloads
/// and issued proxies older than `record_retention_days`, every `purge_interval_seconds`, the
/// first time at start.
async fn membership_purge_loop(state: Arc<AppState>) {
    let every = state.registry.settings.purge_interval_seconds;
    let mut tick = tokio::time::interval(Duration::from_secs(every));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let actor = state.issuer.clone();
    loop {
        tick.tick().await;
        let (store, reg, actor) = (state.store.clone(), state.registry.clone(), actor.clone());
        let res =
            tokio::task::spawn_blocking(move || reg.purge(&store, &actor, chrono::Utc::now()))
                .await;
        match res {
            Ok(Ok(n)) if n == Default::default() => {}
            Ok(Ok(n)) => tracing::info!(
                members = n.members,
                requests = n.requests,
                notifications = n.notifications,
                "membership purge: deleted the registry data of memberships past the retention period"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "membership purge failed"),
            Err(e) => tracing::error!(error = %e, "membership purge task failed"),
        }
        let (store, keep) = (state.store.clone(), state.record_retention);
        let res =
            tokio::task::spawn_blocking(move || store.expire_records(chrono::Utc::now() - keep))
                .await;
        match res {
            Ok(Ok(r)) if r == Default::default() => {}
            Ok(Ok(r)) => tracing::info!(
                payloads = r.payloads,
                commands = r.commands,
                information = r.information,
                proxy_signings = r.proxy_signings,
                "retention: deleted the records of payloads and issued proxies past record_retention_days"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "retention of records failed"),
            Err(e) => tracing::error!(error = %e, "retention of records task failed"),
        }
    }
}

/// Deletes the bundles and output archives of payloads final for longer than the retention
/// period. Runs every half retention period, between 1 s and 5 minutes, so a file is gone at
/// most that long after its time.
async fn retention_loop(state: Arc<AppState>) {
    let half = (state.retention.num_milliseconds() / 2).clamp(1000, 300_000) as u64;
    let mut tick = tokio::time::interval(Duration::from_millis(half));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = state.store.clone();
        let retention = state.retention;
        let res = tokio::task::spawn_blocking(move || {
            let now = chrono::Utc::now();
            // Delegated credentials go when they expire, whatever the retention period.
            match store.expire_delegations(now) {
                Ok(0) => {}
                Ok(n) => tracing::info!(
                    delegations = n,
                    "retention: deleted expired delegated credentials and their keys"
                ),
                Err(e) => tracing::error!(error = %e, "retention of delegations failed"),
            }
            store.expire_files(now - retention, now)
        })
        .await;
        match res {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!(
                payloads = n,
                "retention: deleted the bundles and outputs of payloads past their retention period"
            ),
            Ok(Err(e)) => tracing::error!(error = %e, "retention failed"),
            Err(e) => tracing::error!(error = %e, "retention task failed"),
        }
    }
}

async fn connection(
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    router: axum::Router,
    state: Arc<AppState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::info!(%remote, error = %e, "TLS handshake refused");
            return;
        }
        Err(_) => {
            tracing::info!(%remote, "TLS handshake timed out");
            return;
        }
    };
    let cert = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
    let classified = cert.and_then(|c| {
        let dn = crate::tls::subject_dn(c)?;
        Some(state.portal.identities.classify(&dn, c))
    });
    let Some(classified) = classified else {
        // Cannot happen with a verifier that requires a certificate; refuse rather than guess.
        tracing::warn!(%remote, "client certificate without a readable subject; closing");
        return;
    };
    let peer = PeerDn(classified.dn.clone());
    let conn = ConnInfo {
        remote,
        peer: Arc::new(classified),
    };
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let router = router.clone();
        let peer = peer.clone();
        let conn = conn.clone();
        async move {
            req.extensions_mut().insert(peer.clone());
            req.extensions_mut().insert(conn);
            let method = req.method().clone();
            let path = req.uri().path().to_string();
            let started = std::time::Instant::now();
            let resp = router
                .oneshot(req.map(axum::body::Body::new))
                .await
                .unwrap_or_else(|never| match never {});
            tracing::info!(
                %method,
                %path,
                %remote,
                dn = %peer.0,
                status = resp.status().as_u16(),
                micros = started.elapsed().as_micros() as u64,
                "request"
            );
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
        }
        _ = stop.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
