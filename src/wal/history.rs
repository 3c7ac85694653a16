//! Timeline history files (`TTTTTTTT.history`).
//!
//! Each line is `parent_tli <TAB> switchpoint <TAB> reason`: timeline
//! `parent_tli` ended at `switchpoint`, where its child began. Blank lines
//! and `#` comments are ignored, as `readTimeLineHistory` does.

use super::lsn::Lsn;
use super::segment::TimelineId;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryEntry {
    pub tli: TimelineId,
    /// Where `tli` ended.
    pub switchpoint: Lsn,
}

/// Parses a history file; errors name the line.
pub fn parse_history(text: &str) -> Result<Vec<HistoryEntry>, String> {
    let mut out: Vec<HistoryEntry> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut f = l.split_whitespace();
        let bad = || format!("history line {}: {line:?}", i + 1);
        let tli: u32 = f.next().and_then(|t| t.parse().ok()).ok_or_else(bad)?;
        let sp: Lsn = f.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        if let Some(prev) = out.last() {
            if TimelineId(tli) <= prev.tli {
                return Err(format!(
                    "history line {}: timeline IDs must increase",
                    i + 1
                ));
            }
        }
        out.push(HistoryEntry {
            tli: TimelineId(tli),
            switchpoint: sp,
        });
    }
    Ok(out)
}

/// Where `ancestor` ended on the way to the timeline whose history this is,
/// or `None` if `ancestor` is not in it.
pub fn switchpoint_of(history: &[HistoryEntry], ancestor: TimelineId) -> Option<Lsn> {
    history
        .iter()
        .find(|e| e.tli == ancestor)
        .map(|e| e.switchpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_postgresql_history() {
        let h = parse_history("1\t0/3000158\tno recovery target specified\n\n# c\n2\t0/5000000\tat restore point \"x\"\n").unwrap();
        assert_eq!(h.len(), 2);
        assert_eq!(
            switchpoint_of(&h, TimelineId(1)),
            Some("0/3000158".parse().unwrap())
        );
        assert_eq!(switchpoint_of(&h, TimelineId(3)), None);
        assert!(parse_history("2\t0/1\tx\n1\t0/2\ty\n").is_err());
        assert!(parse_history("x\t0/1\n").is_err());
    }
}
