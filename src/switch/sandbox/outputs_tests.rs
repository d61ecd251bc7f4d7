//! Output copying: symlinks, escapes, swaps and the size limit are never followed or exceeded.

use super::*;

fn names(c: &Collected) -> Vec<String> {
    let bytes = c.archive.as_ref().unwrap();
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(&bytes[..]));
    ar.entries()
        .unwrap()
        .map(|e| e.unwrap().path().unwrap().display().to_string())
        .collect()
}

#[test]
fn skips_symlinks_and_escapes() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("ok.txt"), b"hello").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", d.path().join("link")).unwrap();
    std::fs::create_dir(d.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc", d.path().join("sub/etc")).unwrap();
    let c = collect(
        d.path(),
        &[
            "ok.txt".into(),
            "link".into(),
            "sub/etc/passwd".into(),
            "../x".into(),
            "nope".into(),
        ],
        1 << 20,
        0,
    );
    assert_eq!(c.skipped.len(), 4, "{:?}", c.skipped);
    assert_eq!(names(&c), vec!["ok.txt"]);
}

#[test]
fn directories_are_walked_without_following_anything() {
    let d = tempfile::tempdir().unwrap();
    let r = d.path().join("res");
    std::fs::create_dir_all(r.join("deep/er")).unwrap();
    std::fs::write(r.join("a.txt"), b"a").unwrap();
    std::fs::write(r.join("deep/er/b.txt"), b"bb").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", r.join("shadow")).unwrap();
    std::os::unix::fs::symlink("loop", r.join("loop")).unwrap();
    std::os::unix::fs::symlink("/etc", r.join("deep/etc")).unwrap();
    nix::unistd::mkfifo(
        &r.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    let c = collect(d.path(), &["res".into()], 1 << 20, 0);
    assert_eq!(
        names(&c),
        vec![
            "res",
            "res/a.txt",
            "res/deep",
            "res/deep/er",
            "res/deep/er/b.txt"
        ]
    );
    let mut skipped = c.skipped.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        vec![
            "res/deep/etc: symbolic link, not followed",
            "res/fifo: a FIFO, not copied",
            "res/loop: symbolic link, not followed",
            "res/shadow: symbolic link, not followed",
        ]
    );
}

#[test]
fn respects_limit_over_the_whole_tree() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("a"), vec![0u8; 100]).unwrap();
    std::fs::write(d.path().join("b"), vec![0u8; 100]).unwrap();
    let c = collect(d.path(), &["a".into(), "b".into()], 150, 0);
    assert_eq!(collect(d.path(), &["a".into()], 150, 4242).skipped.len(), 1);
    assert_eq!(c.skipped.len(), 1);
    assert!(c.skipped[0].starts_with("b:"));
    // A tree: the limit counts every file in it.
    std::fs::create_dir(d.path().join("t")).unwrap();
    for n in ["1", "2", "3"] {
        std::fs::write(d.path().join("t").join(n), vec![1u8; 60]).unwrap();
    }
    let c = collect(d.path(), &["t".into()], 150, 0);
    assert_eq!(names(&c), vec!["t", "t/1", "t/2"]);
    assert_eq!(c.skipped.len(), 1, "{:?}", c.skipped);
    assert!(
        c.skipped[0].starts_with("t/3: 60 bytes would exceed"),
        "{:?}",
        c.skipped
    );
    // A huge sparse file is refused by its size, never read.
    let f = File::create(d.path().join("t/sparse")).unwrap();
    f.set_len(1 << 40).unwrap();
    let c = collect(d.path(), &["t/sparse".into()], 1 << 20, 0);
    assert!(
        c.skipped[0].contains("1099511627776 bytes would exceed"),
        "{:?}",
        c.skipped
    );
}

/// A payload's process (here a thread) swapping a directory for a symlink to somewhere
/// else while the helper copies: the copy never contains what the symlink points to.
#[test]
fn a_directory_swapped_for_a_symlink_during_the_copy_is_never_followed() {
    let d = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), b"not yours").unwrap();
    let res = d.path().join("res");
    std::fs::create_dir_all(res.join("sub")).unwrap();
    for i in 0..50 {
        std::fs::write(res.join("sub").join(format!("f{i}")), b"x").unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let swapper = {
        let (res, outside, stop) = (res.clone(), outside.path().to_path_buf(), stop.clone());
        std::thread::spawn(move || {
            let mut swaps = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                std::fs::rename(res.join("sub"), res.join("real")).unwrap();
                std::os::unix::fs::symlink(&outside, res.join("sub")).unwrap();
                std::fs::remove_file(res.join("sub")).unwrap();
                std::fs::rename(res.join("real"), res.join("sub")).unwrap();
                swaps += 1;
            }
            swaps
        })
    };
    let uid = nix::unistd::getuid().as_raw();
    let mut seen_symlink = 0;
    for _ in 0..300 {
        let c = collect(d.path(), &["res".into(), "res/sub".into()], 1 << 20, uid);
        let n = names(&c);
        assert!(!n.iter().any(|n| n.ends_with("secret")), "{n:?}");
        if c.skipped
            .iter()
            .any(|s| s.contains("symbolic link") || s.contains("replaced"))
        {
            seen_symlink += 1;
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let swaps = swapper.join().unwrap();
    assert!(swaps > 0);
    // The race was really run: some copies met the symlink (and refused it).
    assert!(seen_symlink > 0, "{swaps} swaps, never met");
}
