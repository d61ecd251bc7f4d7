//! `mupilot-switch policy check|eval` (phase-0 placeholder; the policy work replaces it).

/// `policy check FILE...`: exit 0 when every file is valid.
pub fn check_main(_files: &[std::path::PathBuf]) -> i32 {
    2
}

/// `policy eval --policy FILE... --request FILE|-`: exit 0 permit, 3 deny, 2 bad input.
pub fn eval_main(_policies: &[std::path::PathBuf], _request: &std::path::Path) -> i32 {
    2
}
