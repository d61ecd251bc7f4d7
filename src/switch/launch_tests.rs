//! Unit tests of the launch checks.

use super::*;

#[test]
fn output_fds_accept_files_and_pipes_only() {
    let f = tempfile::tempfile().unwrap();
    let (r, w) = nix::unistd::pipe().unwrap();
    let got = output_fds(vec![OwnedFd::from(f), w]).unwrap();
    assert!(got.0.is_some() && got.1.is_some());
    let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
    let f = tempfile::tempfile().unwrap();
    let e = output_fds(vec![OwnedFd::from(f), OwnedFd::from(a)]).unwrap_err();
    assert!(
        e.to_string().contains("stderr descriptor is a socket"),
        "{e}"
    );
    let e = output_fds(vec![r]).unwrap_err();
    assert!(matches!(e, LaunchError::FdCount(1)));
    let ro = std::fs::File::open("/dev/null").unwrap();
    let f = tempfile::tempfile().unwrap();
    let e = output_fds(vec![OwnedFd::from(f), OwnedFd::from(ro)]).unwrap_err();
    assert!(e.to_string().contains("character device"), "{e}");
}
