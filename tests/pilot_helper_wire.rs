//! The pilot's helper client against a helper double on a real unix socket: hello and welcome,
//! launch frames carrying the stdout/stderr descriptors, events, signals, refusals.

mod pilot_support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use mupilot::pilot::helper_client::{connect, HelperApi, HelperError, HelperMsg};
use mupilot::protocol::envelope::VoSigningKey;
use mupilot::protocol::switch_wire::{PilotHello, SwitchEvent};
use pilot_support::{FakeHelper, HelperMode};

fn hello() -> PilotHello {
    PilotHello {
        pilot_id: "plt-pilot".into(),
        pilot_dn: Some("/DC=org/DC=mupilot-plt/CN=pilot".into()),
        batch_system: Some("slurm".into()),
        batch_job_id: Some("77".into()),
        slot_cores: Some(2),
        slot_memory_bytes: Some(1 << 30),
        slot_deadline_unix: None,
    }
}

fn open_0600(p: &std::path::Path) -> std::fs::File {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(p)
        .unwrap()
}

fn next(rx: &mut tokio::sync::mpsc::UnboundedReceiver<HelperMsg>) -> HelperMsg {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match rx.try_recv() {
            Ok(m) => return m,
            Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                assert!(std::time::Instant::now() < deadline, "no helper event");
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[test]
fn launch_passes_output_descriptors_and_events_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHelper::start(dir.path(), HelperMode::Run(Some(Duration::from_millis(50))));
    let (conn, welcome, mut rx) = connect(&fake.socket, hello()).unwrap();
    assert_eq!(welcome.host, "plt-node");
    let key = VoSigningKey::generate();
    let w = pilot_support::work(&key, "wire-1", 1);
    let out = open_0600(&dir.path().join("stdout"));
    let err = open_0600(&dir.path().join("stderr"));
    conn.launch(&w.envelope, None, &out, &err).unwrap();
    match next(&mut rx) {
        HelperMsg::Event(SwitchEvent::Started {
            payload_id,
            account,
            ..
        }) => {
            assert_eq!(payload_id, "wire-1");
            assert_eq!(account, "mpt-plt-a");
        }
        other => panic!("{other:?}"),
    }
    match next(&mut rx) {
        HelperMsg::Event(SwitchEvent::Exited { payload_id, report }) => {
            assert_eq!(payload_id, "wire-1");
            assert_eq!(report.exit_code, Some(0));
            assert!(report.outputs.is_some());
        }
        other => panic!("{other:?}"),
    }
    // The helper wrote through the descriptors the pilot passed.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("stdout")).unwrap(),
        "stdout of wire-1\n"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("stderr")).unwrap(),
        "stderr line\n"
    );
    let mode = std::fs::metadata(dir.path().join("stdout"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    conn.signal("wire-1", 15, "test").unwrap();
    assert!(matches!(
        next(&mut rx),
        HelperMsg::Event(SwitchEvent::Signalled { ok: true, .. })
    ));
    assert!(matches!(
        next(&mut rx),
        HelperMsg::Event(SwitchEvent::Exited { .. })
    ));
    drop(conn);
    fake.thread.join().unwrap();
    let log = fake.log.lock().unwrap();
    assert_eq!(log.hello.as_ref().unwrap(), &hello());
    assert_eq!(log.launches, vec!["wire-1".to_string()]);
    assert_eq!(log.launch_fds, vec![2]);
    assert_eq!(log.signals, vec![("wire-1".to_string(), 15)]);
}

#[test]
fn closed_connection_is_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeHelper::start(dir.path(), HelperMode::DropAfterStart);
    let (conn, _, mut rx) = connect(&fake.socket, hello()).unwrap();
    let key = VoSigningKey::generate();
    let w = pilot_support::work(&key, "wire-2", 1);
    let f = tempfile::tempfile().unwrap();
    conn.launch(&w.envelope, None, &f, &f).unwrap();
    assert!(matches!(
        next(&mut rx),
        HelperMsg::Event(SwitchEvent::Started { .. })
    ));
    assert!(matches!(next(&mut rx), HelperMsg::Closed(_)));
}

#[test]
fn refusals_and_absence_are_errors_naming_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing.sock");
    match connect(&missing, hello()) {
        Err(e @ HelperError::Unreachable { .. }) => {
            assert!(e.to_string().contains("nothing.sock"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("connected to nothing"),
    }

    let d1 = tempfile::tempdir().unwrap();
    let fake = FakeHelper::start(d1.path(), HelperMode::RefuseClose);
    match connect(&fake.socket, hello()) {
        Err(e @ HelperError::Refused { .. }) => assert!(e.to_string().contains("allowed_pilots")),
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted"),
    }

    let d2 = tempfile::tempdir().unwrap();
    let fake = FakeHelper::start(
        d2.path(),
        HelperMode::RefuseError("uid 1234 is not an allowed pilot".into()),
    );
    match connect(&fake.socket, hello()) {
        Err(e @ HelperError::Refused { .. }) => {
            assert!(e.to_string().contains("uid 1234"), "{e}")
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("accepted"),
    }
}
