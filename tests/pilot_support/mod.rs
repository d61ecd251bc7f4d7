//! Test doubles for the pilot's integration tests: a helper that speaks the real switch wire
//! protocol on a real unix socket (fd passing included), a VO server that speaks real HTTPS
//! with mutual TLS, and the certificates for both. Every resource lives in a temp directory;
//! servers bind 127.0.0.1:0.
#![allow(dead_code)]

use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use chrono::Utc;
use mupilot::protocol::api::{MatchResponse, StatusAck, StatusReport, Work};
use mupilot::protocol::envelope::{
    EnvelopeBody, Owner, Resources, SignedEnvelope, VoSigningKey, ENVELOPE_VERSION,
};
use mupilot::protocol::switch_wire::{
    read_frame, write_frame, ExitReport, PilotHello, SwitchEvent, SwitchRequest, WireError,
};

/// A signed payload for `id`.
pub fn work(key: &VoSigningKey, id: &str, cores: u32) -> Work {
    let now = Utc::now();
    let body = EnvelopeBody {
        version: ENVELOPE_VERSION,
        payload_id: id.into(),
        owner: Owner {
            dn: "/DC=org/DC=mupilot-demo/CN=alice".into(),
            vo: "demo".into(),
            fqans: vec!["/demo".into()],
            membership_valid_until: now + chrono::Duration::days(1),
        },
        jobtag: Some("plt".into()),
        argv: vec!["/bin/echo".into(), "hi".into()],
        env: Default::default(),
        bundle_sha256: None,
        resources: Resources {
            cores,
            memory_bytes: 64 << 20,
            walltime_seconds: 60,
        },
        outputs: vec!["result.txt".into()],
        not_before: now,
        not_after: now + chrono::Duration::minutes(10),
        node: "plt-node".into(),
        pilot_id: "plt-pilot".into(),
        nonce: format!("plt-nonce-{id}-{}", Utc::now().timestamp_micros()),
        issuer: "plt-test".into(),
        credential: None,
    };
    Work {
        payload_id: id.into(),
        envelope: key.sign(&body),
        bundle: None,
        heartbeat_seconds: None,
        requeue_after: None,
        live_usage: false,
    }
}

fn payload_id_of(env: &SignedEnvelope) -> String {
    let body: EnvelopeBody = serde_json::from_slice(&B64.decode(&env.body).unwrap()).unwrap();
    body.payload_id
}

/// A tar.gz (base64) with one file `result.txt`, as the helper sends outputs back.
pub fn outputs_archive(content: &str) -> String {
    let mut t = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut h = tar::Header::new_gnu();
    h.set_size(content.len() as u64);
    h.set_mode(0o644);
    t.append_data(&mut h, "result.txt", content.as_bytes())
        .unwrap();
    B64.encode(t.into_inner().unwrap().finish().unwrap())
}

/// How the fake helper behaves.
#[derive(Debug, Clone)]
pub enum HelperMode {
    /// Start every payload; it exits 0 after the delay, or runs until signalled when None.
    Run(Option<Duration>),
    /// Deny every payload (authorization).
    Deny,
    /// Close the connection after the first payload started (the helper died).
    DropAfterStart,
    /// Close without a welcome.
    RefuseClose,
    /// Answer hello with an error.
    RefuseError(String),
}

/// What the fake helper saw.
#[derive(Debug, Default)]
pub struct HelperLog {
    pub hello: Option<PilotHello>,
    pub launches: Vec<String>,
    /// Number of fds each launch frame carried.
    pub launch_fds: Vec<usize>,
    pub signals: Vec<(String, i32)>,
}

/// A fake helper serving one connection on a real unix socket.
pub struct FakeHelper {
    pub socket: PathBuf,
    pub log: Arc<Mutex<HelperLog>>,
    pub thread: std::thread::JoinHandle<()>,
}

impl FakeHelper {
    pub fn start(dir: &Path, mode: HelperMode) -> FakeHelper {
        let socket = dir.join("plt-switch.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let log = Arc::new(Mutex::new(HelperLog::default()));
        let l2 = log.clone();
        let thread = std::thread::spawn(move || serve(listener, mode, l2));
        FakeHelper {
            socket,
            log,
            thread,
        }
    }
}

fn serve(listener: UnixListener, mode: HelperMode, log: Arc<Mutex<HelperLog>>) {
    let (mut s, _) = listener.accept().unwrap();
    let (hello, _): (SwitchRequest, _) = read_frame(&mut s).unwrap();
    let SwitchRequest::Hello(h) = hello else {
        panic!("first frame is not hello: {hello:?}")
    };
    log.lock().unwrap().hello = Some(h);
    match &mode {
        HelperMode::RefuseClose => return,
        HelperMode::RefuseError(r) => {
            write_frame(&mut s, &SwitchEvent::Error { reason: r.clone() }, &[]).unwrap();
            return;
        }
        _ => {}
    }
    let welcome = SwitchEvent::Welcome {
        host: "plt-node".into(),
        helper_version: "fake".into(),
    };
    write_frame(&mut s, &welcome, &[]).unwrap();
    loop {
        let (req, fds): (SwitchRequest, _) = match read_frame(&mut s) {
            Ok(x) => x,
            Err(WireError::Closed) => return,
            Err(e) => panic!("fake helper read: {e}"),
        };
        match req {
            SwitchRequest::Launch { envelope, .. } => {
                let id = payload_id_of(&envelope);
                {
                    let mut l = log.lock().unwrap();
                    l.launches.push(id.clone());
                    l.launch_fds.push(fds.len());
                }
                // Write through the passed descriptors, as the payload would.
                let mut fds = fds.into_iter();
                if let (Some(o), Some(e)) = (fds.next(), fds.next()) {
                    std::fs::File::from(o)
                        .write_all(format!("stdout of {id}\n").as_bytes())
                        .unwrap();
                    std::fs::File::from(e).write_all(b"stderr line\n").unwrap();
                }
                if let HelperMode::Deny = mode {
                    let ev = SwitchEvent::Denied {
                        payload_id: id,
                        class: mupilot::protocol::switch_wire::DenialClass::Authorization,
                        reason: "no grid-mapfile entry for /DC=org/DC=mupilot-demo/CN=carol".into(),
                    };
                    write_frame(&mut s, &ev, &[]).unwrap();
                    continue;
                }
                let started = SwitchEvent::Started {
                    payload_id: id.clone(),
                    account: "mpt-plt-a".into(),
                    uid: 61001,
                    gid: 61001,
                    pid: 12345,
                    cgroup: "/mupilot-test-plt/payload".into(),
                    scratch: "/tmp/plt".into(),
                };
                write_frame(&mut s, &started, &[]).unwrap();
                match mode {
                    HelperMode::DropAfterStart => return,
                    HelperMode::Run(Some(d)) => {
                        std::thread::sleep(d);
                        let ev = SwitchEvent::Exited {
                            payload_id: id,
                            report: ExitReport {
                                exit_code: Some(0),
                                cpu_seconds: 0.5,
                                peak_memory_bytes: Some(10 << 20),
                                wall_seconds: d.as_secs_f64(),
                                outputs: Some(outputs_archive("result of payload\n")),
                                ..Default::default()
                            },
                        };
                        write_frame(&mut s, &ev, &[]).unwrap();
                    }
                    _ => {}
                }
            }
            SwitchRequest::Signal {
                payload_id, signal, ..
            } => {
                log.lock()
                    .unwrap()
                    .signals
                    .push((payload_id.clone(), signal));
                let ack = SwitchEvent::Signalled {
                    payload_id: payload_id.clone(),
                    ok: true,
                    reason: None,
                };
                write_frame(&mut s, &ack, &[]).unwrap();
                let ev = SwitchEvent::Exited {
                    payload_id,
                    report: ExitReport {
                        signal: Some(signal),
                        wall_seconds: 1.0,
                        kill_reason: Some("pilot_request".into()),
                        ..Default::default()
                    },
                };
                write_frame(&mut s, &ev, &[]).unwrap();
            }
            SwitchRequest::Status => {
                write_frame(&mut s, &SwitchEvent::Running { payloads: vec![] }, &[]).unwrap();
            }
            SwitchRequest::Hello(_) => panic!("second hello"),
            SwitchRequest::AdminKill { .. } => panic!("a pilot never sends admin requests"),
            SwitchRequest::ProxyRequest { .. }
            | SwitchRequest::LaunchWithProxy { .. }
            | SwitchRequest::ProxyRenew { .. }
            | SwitchRequest::ProxyRenewed { .. } => {
                panic!("no payload of these tests carries a delegated credential: {req:?}")
            }
            SwitchRequest::Glexec(_) => panic!("the pilot never sends glexec requests"),
            SwitchRequest::Command { .. } => {
                panic!("the VO server double sends no signed commands")
            }
        }
    }
}

/// CA, server and pilot certificates written as PEM files in a directory.
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub pilot_cert: PathBuf,
    pub pilot_key: PathBuf,
}

pub fn pki(dir: &Path) -> Pki {
    use rcgen::{
        BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose,
        IsCa, KeyPair,
    };
    // rcgen keeps one value per attribute type, so the test DNs are /O=mupilot-plt/CN=<name>.
    let dc = |n: &mut DistinguishedName, cn: &str| {
        *n = DistinguishedName::new();
        n.push(DnType::OrganizationName, "mupilot-plt");
        n.push(DnType::CommonName, cn);
    };
    let mut ca_p = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    dc(&mut ca_p.distinguished_name, "plt CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_p.self_signed(&ca_key).unwrap();
    let mut srv =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    dc(&mut srv.distinguished_name, "localhost");
    srv.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let srv_key = KeyPair::generate().unwrap();
    let srv_cert = srv.signed_by(&srv_key, &ca, &ca_key).unwrap();
    let mut pil = CertificateParams::new(Vec::<String>::new()).unwrap();
    dc(&mut pil.distinguished_name, "pilot");
    pil.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let pil_key = KeyPair::generate().unwrap();
    let pil_cert = pil.signed_by(&pil_key, &ca, &ca_key).unwrap();
    let w = |name: &str, text: String| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    Pki {
        ca: w("ca.pem", ca.pem()),
        server_cert: w("server.crt", srv_cert.pem()),
        server_key: w("server.key", srv_key.serialize_pem()),
        pilot_cert: w("pilot.crt", pil_cert.pem()),
        pilot_key: w("pilot.key", pil_key.serialize_pem()),
    }
}

/// What the fake VO server saw.
#[derive(Default)]
pub struct VoLog {
    pub queue: Vec<Work>,
    /// Error answers (status, body) given to the next matches, before any work.
    pub inject: std::collections::VecDeque<(u16, String)>,
    pub matches: u32,
    pub reports: Vec<(String, StatusReport)>,
    pub uploads: Vec<(String, String, Vec<u8>)>,
}

/// A VO server double speaking HTTPS with client certificates required.
pub struct FakeVo {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<VoLog>>,
}

impl FakeVo {
    pub fn start(pki: &Pki, queue: Vec<Work>) -> FakeVo {
        use axum::extract::{Path as AxPath, State};
        use axum::routing::{post, put};
        use axum::Json;
        let log = Arc::new(Mutex::new(VoLog {
            queue,
            ..Default::default()
        }));
        let tls = mupilot::tls::server_config(&pki.server_cert, &pki.server_key, &pki.ca).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let state = log.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let app = axum::Router::new()
                    .route(
                        "/v1/match",
                        post(|State(s): State<Arc<Mutex<VoLog>>>| async move {
                            let mut l = s.lock().unwrap();
                            l.matches += 1;
                            if let Some((code, body)) = l.inject.pop_front() {
                                let code = axum::http::StatusCode::from_u16(code).unwrap();
                                return axum::response::IntoResponse::into_response((code, body));
                            }
                            let work = if l.queue.is_empty() {
                                None
                            } else {
                                Some(l.queue.remove(0))
                            };
                            axum::response::IntoResponse::into_response(Json(MatchResponse {
                                work,
                            }))
                        }),
                    )
                    .route(
                        "/v1/payloads/:id/status",
                        post(
                            |State(s): State<Arc<Mutex<VoLog>>>,
                             AxPath(id): AxPath<String>,
                             Json(r): Json<StatusReport>| async move {
                                s.lock().unwrap().reports.push((id, r));
                                Json(StatusAck::default())
                            },
                        ),
                    )
                    .route(
                        "/v1/payloads/:id/output",
                        put(
                            |State(s): State<Arc<Mutex<VoLog>>>,
                             AxPath(id): AxPath<String>,
                             headers: axum::http::HeaderMap,
                             body: axum::body::Bytes| async move {
                                let ct = headers
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string();
                                s.lock().unwrap().uploads.push((id, ct, body.to_vec()));
                                axum::http::StatusCode::NO_CONTENT
                            },
                        ),
                    )
                    .with_state(state);
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                let acceptor = tokio_rustls::TlsAcceptor::from(tls);
                loop {
                    let (tcp, _) = listener.accept().await.unwrap();
                    let acceptor = acceptor.clone();
                    let app = app.clone();
                    tokio::spawn(async move {
                        let Ok(tls) = acceptor.accept(tcp).await else {
                            return;
                        };
                        let svc = hyper_util::service::TowerToHyperService::new(app);
                        let _ = hyper_util::server::conn::auto::Builder::new(
                            hyper_util::rt::TokioExecutor::new(),
                        )
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                        .await;
                    });
                }
            });
        });
        let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
        FakeVo { addr, log }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// Writes a pilot.toml for these parts and returns its path.
pub fn pilot_toml(dir: &Path, pki: &Pki, url: &str, socket: &Path, extra: &str) -> PathBuf {
    let text = format!(
        "server_url = \"{url}\"\ncert = \"{}\"\nkey = \"{}\"\nca = \"{}\"\nswitch_socket = \"{}\"\nwork_dir = \"work\"\npilot_id = \"plt-pilot\"\npoll_interval_seconds = 1\nidle_timeout_seconds = 2\ngrace_seconds = 1\n{extra}",
        pki.pilot_cert.display(),
        pki.pilot_key.display(),
        pki.ca.display(),
        socket.display()
    );
    let p = dir.join("pilot.toml");
    std::fs::write(&p, text).unwrap();
    p
}
