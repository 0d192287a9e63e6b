//! A hostile guest cannot grow pvstack's log without bound: the lines it
//! triggers with MMIO no device claims, unknown hypercalls and doorbells
//! outside RAM are rate-limited per call site, and pvstack keeps serving
//! the guest.

use pvstack_tests::run_pvstack;

/// Events of each kind the guest causes.
const COUNT: u64 = 2000;
/// Lines the log may hold for four kinds of events: pvstack-logging
/// writes at most 10 per call site per 10 s, and the run takes seconds.
const MAX_LINES: usize = 4 * 10 * 3;

#[test]
fn a_guest_flooding_bad_accesses_and_hypercalls_leaves_a_bounded_log() {
    let run = run_pvstack(&["run", "--guest-args", &format!("vmm-evil count={COUNT}")]);
    assert_eq!(run.code(), 0, "{run:#?}");
    let result = run.result("vmm-evil");
    for key in ["count", "all_ones", "unknown_calls"] {
        assert_eq!(result[key], COUNT.to_string(), "{key}: {run:#?}");
    }
    assert_eq!(result["still_served"], "1");
    let lines = run.stderr.lines().count();
    let head: String = run.stderr.lines().take(20).collect::<Vec<_>>().join("\n");
    assert!(
        lines <= MAX_LINES,
        "{lines} log lines for {} bad events; the first:\n{head}",
        4 * COUNT
    );
    assert!(run.stderr.contains("unmapped MMIO"), "{}", run.stderr);
    assert!(run.stderr.contains("unknown hypercall"), "{}", run.stderr);
}
