//! Live usage through the real helper (as root, real accounts and cgroups: v1 on this host,
//! v2 in the VM through scripts/vm-test-sandbox.sh): a payload burning CPU and holding memory
//! shows rising numbers in the `running` answer to `status`, read from its own cgroup; another
//! pilot's connection sees none of it; an `information` request the site permits carries the
//! same usage and the process count, and another VO's is refused. And what one `status` request costs with 8 payloads
//! running (printed; docs/benchmarks.md).

mod switch_support;

use std::time::{Duration, Instant};

use mupilot::protocol::command::{CommandAction, CommandBody, SignedCommand};
use mupilot::protocol::switch_wire::{PayloadUsage, RunningPayload, SwitchEvent, SwitchRequest};
use mupilot::protocol::VoSigningKey;
use switch_support::common::{layout, Layout};
use switch_support::*;

/// The second VO this site trusts (its key signs nothing of the first VO's payloads).
const VO2: &str = "swdvo2";

/// A site whose payloads may have a loopback-only network namespace on kernels without
/// Landlock scoping (the VM's), whose policy lets owners ask for information, and which trusts
/// a second VO ([`VO2`], key returned).
fn site() -> (Site, VoSigningKey) {
    let site = Site::new();
    let key2 = VoSigningKey::generate();
    std::fs::write(site.path("vo2.pub"), key2.verifying_key().to_pem()).unwrap();
    std::fs::write(
        site.path("site.policy"),
        "/DC=org/DC=mupilot-test:\n&(action = start)\n&(action = cancel information)(jobowner = SELF)\n",
    )
    .unwrap();
    let text = std::fs::read_to_string(&site.config)
        .unwrap()
        .replace(
            "[sandbox]\n",
            &format!(
                "[[vo]]\nname = \"{VO2}\"\npublic_key = \"vo2.pub\"\n[sandbox]\nipc_fallback = \"loopback\"\n"
            ),
        );
    std::fs::write(
        &site.config,
        format!("{text}[authz]\nsite_policy = \"site.policy\"\n"),
    )
    .unwrap();
    (site, key2)
}

fn status(c: &mut Client) -> Vec<RunningPayload> {
    match c.call(&SwitchRequest::Status, &[]) {
        SwitchEvent::Running { payloads } => payloads,
        ev => panic!("expected running, got {ev:?}"),
    }
}

fn usage_of(c: &mut Client, id: &str) -> PayloadUsage {
    let list = status(c);
    let p = list
        .iter()
        .find(|p| p.payload_id == id)
        .unwrap_or_else(|| panic!("{id} not in {list:?}"));
    p.usage.expect("the helper reports usage")
}

/// Waits until `ok` holds for the payload's usage; returns that usage.
fn wait_usage(
    c: &mut Client,
    id: &str,
    what: &str,
    ok: impl Fn(&PayloadUsage) -> bool,
) -> PayloadUsage {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let u = usage_of(c, id);
        if ok(&u) {
            return u;
        }
        assert!(Instant::now() < deadline, "{what}: {u:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn status_reports_rising_usage_of_this_connections_payloads_only() {
    let _u = Users::acquire();
    let (site, key2) = site();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    // 40 MB held in a shell variable, then a busy loop.
    let mut body = site.body(
        DN_ALICE,
        &[
            "sh",
            "-c",
            "a=$(head -c 40000000 /dev/zero | tr '\\0' x); while :; do :; done",
        ],
    );
    body.resources.memory_bytes = 512 << 20;
    let id = body.payload_id.clone();
    let SwitchEvent::Started { cgroup, pid, .. } = c.launch(&site.sign(&body), None) else {
        panic!("not started")
    };
    let first = wait_usage(&mut c, &id, "40 MB and some CPU", |u| {
        u.memory_bytes >= 40_000_000 && u.cpu_seconds > 0.2
    });
    // Peak: v1 memory.max_usage_in_bytes, v2 memory.peak (the VM's 6.1 kernel has it).
    let peak = first.peak_memory_bytes.expect("a peak on this kernel");
    assert!(peak >= first.memory_bytes, "{first:?}");
    std::thread::sleep(Duration::from_millis(1500));
    let later = usage_of(&mut c, &id);
    assert!(
        later.cpu_seconds >= first.cpu_seconds + 0.5,
        "CPU rises while it burns: {first:?} then {later:?}"
    );
    assert!(later.peak_memory_bytes.unwrap() >= peak);
    // The numbers are the cgroup's own files.
    let cpu_file = match layout() {
        Layout::V1 => {
            // The payload's cpuacct cgroup, from its main process's /proc/PID/cgroup.
            let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
            let (lines, _) = mupilot::cgroups::membership::parse_all(&text);
            let line = lines.iter().find(|m| m.has("cpuacct")).unwrap();
            let mount = ["cpuacct", "cpu,cpuacct", "cpuacct,cpu"]
                .iter()
                .map(|m| format!("/sys/fs/cgroup/{m}"))
                .find(|m| std::path::Path::new(m).is_dir())
                .unwrap();
            std::fs::read_to_string(format!("{mount}{}/cpuacct.usage", line.path))
                .map(|s| s.trim().parse::<f64>().unwrap() / 1e9)
        }
        Layout::V2 => std::fs::read_to_string(format!("{cgroup}/cpu.stat")).map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("usage_usec "))
                .unwrap()
                .trim()
                .parse::<f64>()
                .unwrap()
                / 1e6
        }),
    }
    .unwrap();
    let now = usage_of(&mut c, &id);
    assert!(
        now.cpu_seconds >= later.cpu_seconds && cpu_file <= now.cpu_seconds,
        "file {cpu_file} vs reported {now:?}"
    );

    // Another pilot's connection learns nothing of it.
    let mut other = Client::hello(
        &site.socket,
        mupilot::protocol::switch_wire::PilotHello {
            pilot_id: "swd-other".into(),
            ..Client::default_hello()
        },
    );
    assert!(status(&mut other).is_empty());

    // The owner's information request (signed by the VO, permitted by the site's policy):
    // state so far, usage, processes, cgroup; its nonce names the request.
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let command_of = |key: &VoSigningKey, vo: &str, nonce: &str| {
        SignedCommand::sign(
            key,
            vo,
            &CommandBody {
                version: 1,
                payload_id: id.clone(),
                action: CommandAction::Information,
                requester_dn: DN_ALICE.into(),
                requester_fqans: vec![],
                signal: None,
                not_after: chrono::Utc::now() + chrono::Duration::minutes(5),
                nonce: nonce.into(),
            },
        )
    };
    let command = |nonce: &str| command_of(&site.key, VO, nonce);
    // Another VO the site trusts cannot ask about this VO's payload.
    match c.call(
        &SwitchRequest::Command {
            command: command_of(&key2, VO2, &format!("{nonce}-0")),
        },
        &[],
    ) {
        SwitchEvent::CommandDone { ok, reason, .. } => {
            assert!(
                !ok && reason.contains(&format!("belongs to VO '{VO}'")),
                "{reason}"
            )
        }
        ev => panic!("{ev:?}"),
    }
    // From the other pilot's connection the payload is not there.
    match other.call(
        &SwitchRequest::Command {
            command: command(&format!("{nonce}-1")),
        },
        &[],
    ) {
        SwitchEvent::CommandDone { ok, reason, .. } => {
            assert!(
                !ok && reason.contains("not running for this pilot"),
                "{reason}"
            )
        }
        ev => panic!("{ev:?}"),
    }
    let cmd = command(&format!("{nonce}-2"));
    match c.call(&SwitchRequest::Command { command: cmd }, &[]) {
        SwitchEvent::CommandDone {
            ok,
            information,
            nonce: answered,
            ..
        } => {
            assert!(ok);
            assert_eq!(answered.as_deref(), Some(format!("{nonce}-2").as_str()));
            let info = information.unwrap();
            assert_eq!(info.account, ACCT);
            assert_eq!(info.cgroup, cgroup);
            assert!(info.started_at.is_some());
            assert!(info.usage.unwrap().cpu_seconds >= now.cpu_seconds);
            assert!(info.processes.unwrap() >= 1, "{info:?}");
            assert_eq!(info.memory_limit_bytes, Some(512 << 20));
        }
        ev => panic!("{ev:?}"),
    }
    drop(c); // the pilot goes: the helper kills its payload
}

/// One `status` request with 8 payloads running: the helper reads 3 files per payload.
/// Printed for docs/benchmarks.md; bounded loosely (the machine is shared).
#[test]
fn one_usage_request_for_8_running_payloads_is_cheap() {
    let _u = Users::acquire();
    let (site, _) = site();
    let _d = site.start();
    let mut c = Client::hello(&site.socket, Client::default_hello());
    let timed = |c: &mut Client, n: usize| -> (Duration, Duration, Duration) {
        let mut took: Vec<Duration> = (0..300)
            .map(|_| {
                let t = Instant::now();
                let list = status(c);
                let d = t.elapsed();
                assert_eq!(list.len(), n);
                d
            })
            .collect();
        took.sort();
        let mean = took.iter().sum::<Duration>() / took.len() as u32;
        (mean, took[took.len() / 2], took[took.len() * 99 / 100])
    };
    let (mean0, p50_0, _) = timed(&mut c, 0);
    for _ in 0..8 {
        let body = site.body(DN_ALICE, &["sleep", "60"]);
        assert!(matches!(
            c.launch(&site.sign(&body), None),
            SwitchEvent::Started { .. }
        ));
    }
    assert_eq!(status(&mut c).len(), 8);
    let (mean, p50, p99) = timed(&mut c, 8);
    eprintln!(
        "usage request, 8 running payloads ({:?}): mean {mean:?}, p50 {p50:?}, p99 {p99:?}; with none running: mean {mean0:?}, p50 {p50_0:?} (round trips over the socket)",
        layout()
    );
    assert!(p50 < Duration::from_millis(20), "p50 {p50:?}");
}
