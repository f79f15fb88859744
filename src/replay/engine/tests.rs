use kvm_bindings::{kvm_regs, kvm_vcpu_events};
use zerocopy::IntoBytes;

use super::*;

fn state(rflags: u64, shadow: u8, injected: u8) -> CpuStateBytes {
    let regs = kvm_regs {
        rflags,
        ..Default::default()
    };
    let mut events = kvm_vcpu_events::default();
    events.interrupt.shadow = shadow;
    events.interrupt.injected = injected;
    CpuStateBytes {
        regs: regs.as_bytes().to_vec(),
        sregs: vec![],
        fpu: vec![],
        events: events.as_bytes().to_vec(),
        msrs: vec![],
        xsave: vec![],
    }
}

#[test]
fn interrupts_go_in_at_a_sync_point_only_when_the_saved_state_allows() {
    assert!(can_inject_from_state(&state(0x202, 0, 0)));
    assert!(!can_inject_from_state(&state(0x002, 0, 0)), "IF clear");
    assert!(
        !can_inject_from_state(&state(0x202, 1, 0)),
        "sti/mov ss shadow"
    );
    assert!(
        !can_inject_from_state(&state(0x202, 0, 1)),
        "an interrupt already pending"
    );
    let mut short = state(0x202, 0, 0);
    short.regs.truncate(10);
    assert!(
        !can_inject_from_state(&short),
        "malformed state never injects"
    );
}
