//! The pilot's VO server client over real HTTPS with mutual TLS: work, retries of transient
//! server errors, clear refusals, and a server the CA does not vouch for.

mod pilot_support;

use std::time::Duration;

use mupilot::pilot::client::{Backoff, ClientError, HttpsServer, ServerApi};
use mupilot::protocol::api::{MatchRequest, PayloadState, StatusReport};
use mupilot::protocol::envelope::VoSigningKey;
use pilot_support::{pki, FakeVo};

fn req() -> MatchRequest {
    MatchRequest {
        pilot_id: "plt-pilot".into(),
        batch_system: None,
        batch_job_id: None,
        host: "node".into(),
        free_cores: 1,
        free_memory_bytes: 1 << 30,
        seconds_left: 600,
    }
}

fn quick() -> Backoff {
    Backoff {
        attempts: 3,
        first: Duration::from_millis(20),
        max: Duration::from_millis(50),
    }
}

#[tokio::test]
async fn match_report_upload_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let key = VoSigningKey::generate();
    let vo = FakeVo::start(&pki, vec![pilot_support::work(&key, "plt-c1", 1)]);
    let c = HttpsServer::new(&vo.url(), &pki.pilot_cert, &pki.pilot_key, &pki.ca)
        .unwrap()
        .with_backoff(quick());
    // Two 503s are retried, then the work comes.
    {
        let mut l = vo.log.lock().unwrap();
        l.inject.push_back((503, "busy".into()));
        l.inject.push_back((503, "busy".into()));
    }
    let w = c.match_work(req()).await.unwrap().unwrap();
    assert_eq!(w.payload_id, "plt-c1");
    assert_eq!(vo.log.lock().unwrap().matches, 3);
    assert!(c.match_work(req()).await.unwrap().is_none());
    let ack = c
        .report(
            "plt-c1".into(),
            StatusReport {
                pilot_id: "plt-pilot".into(),
                state: Some(PayloadState::Running),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(ack.commands.is_empty());
    c.upload("plt-c1".into(), vec![0x1f, 0x8b]).await.unwrap();
    assert_eq!(vo.log.lock().unwrap().uploads[0].2, vec![0x1f, 0x8b]);

    // A 4xx is not retried and carries the server's message.
    vo.log.lock().unwrap().inject.push_back((
        403,
        r#"{"error":"not_authorized","message":"pilot DN is not in pilot_dns"}"#.into(),
    ));
    let before = vo.log.lock().unwrap().matches;
    let err = c.match_work(req()).await.unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status: 403, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pilot_dns"), "{err}");
    assert_eq!(vo.log.lock().unwrap().matches, before + 1);

    // Persistent 5xx ends as unreachable after the attempts.
    for _ in 0..3 {
        vo.log
            .lock()
            .unwrap()
            .inject
            .push_back((500, "down".into()));
    }
    let err = c.match_work(req()).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[tokio::test]
async fn server_outside_the_trusted_cas_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki_a = pki(dir.path());
    let other = tempfile::tempdir().unwrap();
    let pki_b = pki(other.path());
    let vo = FakeVo::start(&pki_a, vec![]);
    // The pilot trusts only CA b: the server's certificate must not be accepted.
    let c = HttpsServer::new(&vo.url(), &pki_b.pilot_cert, &pki_b.pilot_key, &pki_b.ca)
        .unwrap()
        .with_backoff(quick());
    let err = c.match_work(req()).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
    assert_eq!(vo.log.lock().unwrap().matches, 0);
}
