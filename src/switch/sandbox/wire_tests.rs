//! The internal wire: every message round-trips, descriptors travel with theirs, and
//! truncated or oversized frames are refused.

use super::*;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};

fn plan() -> Plan {
    // A place as `Cgroup::locate` finds it on a v2 node (locate itself reads this host's
    // mount table).
    let cgroup = serde_json::from_str(
        r#"{"cgroup":{"V2":{"dir":"/sys/fs/cgroup/job/mupilot-p-1","mount":"/sys/fs/cgroup"}},"joins":[]}"#,
    )
    .unwrap();
    Plan {
        payload_id: "p-1".into(),
        account: Account {
            name: "alice".into(),
            uid: 51023,
            gid: 51000,
            groups: vec![51001],
        },
        argv: vec!["/bin/echo".into(), "héllo\n\"quoted\"".into()],
        env: vec![("HOME".into(), "/scratch/p-1".into())],
        cgroup,
        scratch_root: "/var/spool/mupilot".into(),
        scratch: "/var/spool/mupilot/p-1".into(),
        nofile: 4096,
        core_bytes: 0,
        allow_user_namespaces: true,
        bundle: false,
        stdin: false,
    }
}

/// Encodes and decodes `msg`; compared as JSON values (a plan's cgroup place has no `==`).
fn round_trip<T: Serialize + DeserializeOwned>(msg: T) {
    let mut buf = Vec::new();
    encode(&msg, &mut buf).unwrap();
    let (back, used): (T, usize) = decode(&buf).unwrap().unwrap();
    assert_eq!(
        serde_json::to_value(&back).unwrap(),
        serde_json::to_value(&msg).unwrap()
    );
    assert_eq!(used, buf.len());
}

fn same(a: &ToStage, b: &ToStage) -> bool {
    serde_json::to_value(a).unwrap() == serde_json::to_value(b).unwrap()
}

#[test]
fn every_message_round_trips() {
    round_trip(ToStage::Wake);
    round_trip(ToStage::Plan(Box::new(plan())));
    round_trip(FromStage::Started {
        pid: 4242,
        stage_pid: 4241,
    });
    round_trip(FromStage::Failed {
        step: "mount /proc".into(),
        error: "EPERM".into(),
        fault: Fault::Node,
    });
    round_trip(FromStage::Failed {
        step: "unpack bundle".into(),
        error: "not gzip".into(),
        fault: Fault::Bundle,
    });
    round_trip(FromStage::Exited {
        code: Some(3),
        signal: None,
    });
    round_trip(FromStage::Exited {
        code: None,
        signal: Some(9),
    });
    round_trip(ToFactory::ForkOne);
    round_trip(FromFactory::Forked { pid: 77 });
    round_trip(FromFactory::Failed {
        error: "pidfd_open: ENOSYS".into(),
    });
}

#[test]
fn a_wake_up_is_its_own_message_not_an_empty_plan() {
    let mut buf = Vec::new();
    encode(&ToStage::Wake, &mut buf).unwrap();
    assert_eq!(&buf[HEADER..], br#"{"msg":"wake"}"#);
    // What the old wire sent as a wake-up ("null") is no message at all now.
    let mut null = Vec::new();
    encode(&(), &mut null).unwrap();
    assert!(matches!(decode::<ToStage>(&null), Err(WireError::Json(_))));
}

#[test]
fn several_messages_in_one_buffer_decode_in_order() {
    let mut buf = Vec::new();
    let started = FromStage::Started {
        pid: 2,
        stage_pid: 1,
    };
    let exited = FromStage::Exited {
        code: Some(0),
        signal: None,
    };
    encode(&started, &mut buf).unwrap();
    encode(&exited, &mut buf).unwrap();
    let (a, n): (FromStage, _) = decode(&buf).unwrap().unwrap();
    let (b, m): (FromStage, _) = decode(&buf[n..]).unwrap().unwrap();
    assert_eq!((a, b), (started, exited));
    assert_eq!(n + m, buf.len());
}

#[test]
fn truncated_frames_are_incomplete_and_refused_at_the_end_of_the_stream() {
    let mut buf = Vec::new();
    encode(
        &FromStage::Exited {
            code: Some(1),
            signal: None,
        },
        &mut buf,
    )
    .unwrap();
    for cut in 0..buf.len() {
        assert!(
            decode::<FromStage>(&buf[..cut]).unwrap().is_none(),
            "cut at {cut}"
        );
    }
    // The stage dies in the middle of a message: the helper's reader names it, not "closed".
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(&buf[..buf.len() - 3]).unwrap();
    drop(a);
    let mut events = Events::new(b);
    match events.next() {
        Err(WireError::Truncated { got, want }) => {
            assert_eq!((got, want), (buf.len() - 3, buf.len()))
        }
        other => panic!("{other:?}"),
    }
    // Nothing at all: closed.
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    assert!(matches!(Events::new(b).next(), Err(WireError::Closed)));
}

#[test]
fn oversized_frames_are_refused_before_their_body() {
    let huge = ((MAX_MESSAGE + 1) as u32).to_be_bytes();
    assert!(matches!(
        decode::<FromStage>(&huge),
        Err(WireError::TooLarge(n)) if n == MAX_MESSAGE + 1
    ));
    let (mut a, b) = UnixStream::pair().unwrap();
    a.write_all(&huge).unwrap();
    assert!(matches!(Events::new(b).next(), Err(WireError::TooLarge(_))));
    // The receiving side of descriptors refuses it too, without waiting for the body.
    let (mut a, mut b) = UnixStream::pair().unwrap();
    a.write_all(&huge).unwrap();
    assert!(matches!(
        recv::<ToStage>(&mut b),
        Err(WireError::TooLarge(_))
    ));
    // And nothing that large is ever encoded.
    let mut out = vec![7u8];
    let big = "x".repeat(MAX_MESSAGE);
    assert!(matches!(
        encode(&big, &mut out),
        Err(WireError::TooLarge(_))
    ));
    assert_eq!(out, [7u8]);
}

#[test]
fn descriptors_travel_with_their_message_after_wake_ups() {
    let (a, mut b) = UnixStream::pair().unwrap();
    send(&a, &ToStage::Wake, &[]).unwrap();
    send(&a, &ToStage::Wake, &[]).unwrap();
    let f = tempfile::tempfile().unwrap();
    let p = ToStage::Plan(Box::new(plan()));
    send(&a, &p, &[f.as_raw_fd(), f.as_fd().as_raw_fd()]).unwrap();
    for _ in 0..2 {
        let (m, fds) = recv::<ToStage>(&mut b).unwrap();
        assert!(matches!(m, ToStage::Wake));
        assert!(fds.is_empty());
    }
    let (m, fds) = recv::<ToStage>(&mut b).unwrap();
    assert!(same(&m, &p));
    assert_eq!(fds.len(), 2);
    drop(a);
    assert!(matches!(recv::<ToStage>(&mut b), Err(WireError::Closed)));
}

#[test]
fn events_sent_together_arrive_together() {
    let (a, b) = UnixStream::pair().unwrap();
    let started = FromStage::Started {
        pid: 2,
        stage_pid: 1,
    };
    let exited = FromStage::Exited {
        code: None,
        signal: Some(15),
    };
    send_all(&a, &[started.clone(), exited.clone()]).unwrap();
    let mut events = Events::new(b);
    assert!(!events.has_message());
    assert_eq!(events.next().unwrap(), started);
    // The exit came in the same read: no second read is needed to know it is there.
    assert!(events.has_message());
    assert_eq!(events.next().unwrap(), exited);
    assert!(!events.has_message());
}

#[test]
fn a_read_that_times_out_keeps_the_part_that_came() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let mut buf = Vec::new();
    encode(
        &FromStage::Exited {
            code: Some(0),
            signal: None,
        },
        &mut buf,
    )
    .unwrap();
    a.write_all(&buf[..5]).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
    let mut events = Events::new(b);
    let e = events.next().unwrap_err();
    assert!(e.timed_out(), "{e}");
    a.write_all(&buf[5..]).unwrap();
    assert_eq!(
        events.next().unwrap(),
        FromStage::Exited {
            code: Some(0),
            signal: None
        }
    );
}

#[test]
fn gates_open_with_their_byte_and_report_a_withdrawal() {
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    open_gate(std::fs::File::from(w));
    pass_gate(&mut std::fs::File::from(r)).unwrap();
    let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    drop(w);
    assert!(matches!(
        pass_gate(&mut std::fs::File::from(r)),
        Err(GateError::Withdrawn)
    ));
}

// Readiness, not elapsed time, is asserted: a slow (emulated) CPU may take longer than the
// budget for one poll.
#[test]
fn the_spin_ends_when_bytes_are_there_and_gives_up_after_the_budget_when_not() {
    let (mut a, b) = UnixStream::pair().unwrap();
    let t = Instant::now();
    assert!(!spin_until_readable(b.as_fd()));
    assert!(t.elapsed() >= SPIN_BUDGET);
    a.write_all(b"x").unwrap();
    assert!(spin_until_readable(b.as_fd()));
    let (a, b) = UnixStream::pair().unwrap();
    drop(a);
    assert!(spin_until_readable(b.as_fd()));
}

#[test]
fn preparation_travels_as_arguments() {
    for network in [
        NetworkMode::Host,
        NetworkMode::None,
        NetworkMode::Loopback,
        NetworkMode::Pasta,
    ] {
        for landlock in [true, false] {
            let prep = Preparation {
                network,
                landlock,
                tmp_size_bytes: 1 << 20,
            };
            let mut args: Vec<String> = prep.args().to_vec();
            assert_eq!(Preparation::parse(&args), Ok((prep, false)));
            args.push("--idle".into());
            assert_eq!(Preparation::parse(&args), Ok((prep, true)));
        }
    }
}

#[test]
fn bad_stage_arguments_are_named() {
    let parse = |a: &[&str]| {
        Preparation::parse(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap_err()
    };
    assert!(parse(&["--network", "wifi", "--tmp-size-bytes", "1"]).contains("\"wifi\""));
    assert!(parse(&["--network", "host", "--tmp-size-bytes", "lots"]).contains("\"lots\""));
    assert!(parse(&["--landlock", "maybe"]).contains("\"maybe\""));
    assert!(parse(&["--network", "host", "--tmp-size-bytes", "1"]).contains("--landlock yes|no"));
    assert!(parse(&["--network"]).contains("--network needs a value"));
    assert!(parse(&["--frobnicate"]).contains("\"--frobnicate\""));
    assert!(parse(&[]).contains("needs --network"));
}
