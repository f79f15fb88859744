//! The arbiter through the twinvm binary: `twinvm arbiter selftest` starts
//! three real arbiter processes (`twinvm arbiter serve`) and checks the
//! decision survives leader loss and a full restart.

mod common;

use std::time::Duration;

#[test]
fn twinvm_arbiter_selftest_passes() {
    let out = common::run_to_end(&["arbiter", "selftest"], Duration::from_secs(120));
    assert!(out.status.success(), "{out:?}");
    assert!(out.stdout.contains("selftest PASS"), "{}", out.stdout);
}
