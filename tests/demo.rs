//! `waltail demo`, the README's first command, runs and tells the truth.

use crate::util::*;

#[test]
fn demo_runs_end_to_end_and_cleans_up() {
    let before: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("waltail-demo"))
        .collect();
    let out = waltail(&["demo", "--seconds", "2"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "commits acknowledged by the primary",
        "commits on the promoted standby",
        "commits lost",
        "standby holds a gap-free prefix | yes",
        "lost window",
        "failover time",
        "timeline | 1 -> 2",
    ] {
        assert!(text.contains(row), "{row} missing from:\n{text}");
    }
    let num = |label: &str| -> i64 {
        let line = text
            .lines()
            .find(|l| l.starts_with(&format!("| {label} |")))
            .unwrap();
        line.split('|').nth(2).unwrap().trim().parse().unwrap()
    };
    let (acked, kept, lost) = (
        num("commits acknowledged by the primary"),
        num("commits on the promoted standby"),
        num("commits lost"),
    );
    assert!(acked > 100, "{text}");
    assert_eq!(lost, (acked - kept).max(0));
    assert!(
        text.contains("standby answers"),
        "the standby is queried while the primary writes"
    );
    let after: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("waltail-demo"))
        .collect();
    assert_eq!(before, after, "the demo left directories behind");
}
