//! The replication commands walreceiver sends, parsed from a simple query.
//!
//! ```text
//! IDENTIFY_SYSTEM
//! TIMELINE_HISTORY <tli>
//! START_REPLICATION [SLOT <name>] [PHYSICAL] <X/X> [TIMELINE <tli>]
//! ```
//!
//! Keywords are case-insensitive; a slot name may be double-quoted (PostgreSQL
//! 15+ quotes it). A trailing `;` is allowed. Anything else is an error that
//! names what was not understood; `LOGICAL` replication is refused.

use crate::wal::{Lsn, TimelineId};

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    IdentifySystem,
    TimelineHistory(TimelineId),
    StartReplication {
        slot: Option<String>,
        start: Lsn,
        /// None: the server's current timeline.
        timeline: Option<TimelineId>,
    },
}

/// Splits into words; a double-quoted word keeps its spaces (`""` is a quote).
fn words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    while let Some(&c) = it.peek() {
        if c.is_whitespace() {
            it.next();
            continue;
        }
        let mut w = String::new();
        if c == '"' {
            it.next();
            loop {
                match it.next() {
                    Some('"') if it.peek() == Some(&'"') => {
                        it.next();
                        w.push('"');
                    }
                    Some('"') => break,
                    Some(ch) => w.push(ch),
                    None => return Err("unterminated quoted identifier".into()),
                }
            }
        } else {
            while let Some(&ch) = it.peek() {
                if ch.is_whitespace() {
                    break;
                }
                w.push(ch);
                it.next();
            }
        }
        out.push(w);
    }
    Ok(out)
}

fn timeline(w: Option<&String>) -> Result<TimelineId, String> {
    w.and_then(|t| t.parse::<u32>().ok())
        .filter(|&t| t > 0)
        .map(TimelineId)
        .ok_or_else(|| {
            format!(
                "{:?} is not a timeline ID",
                w.map(String::as_str).unwrap_or("")
            )
        })
}

/// Parses one query string.
pub fn parse(query: &str) -> Result<Command, String> {
    let q = query.trim().trim_end_matches(';').trim();
    let w = words(q)?;
    let kw = |i: usize| w.get(i).map(|s| s.to_ascii_uppercase());
    let shown: String = q.chars().take(80).collect();
    match kw(0).as_deref() {
        Some("IDENTIFY_SYSTEM") if w.len() == 1 => Ok(Command::IdentifySystem),
        Some("TIMELINE_HISTORY") if w.len() == 2 => Ok(Command::TimelineHistory(timeline(w.get(1))?)),
        Some("START_REPLICATION") => {
            let mut i = 1;
            let mut slot = None;
            if kw(i).as_deref() == Some("SLOT") {
                slot = Some(
                    w.get(i + 1)
                        .cloned()
                        .ok_or_else(|| "START_REPLICATION SLOT without a name".to_string())?,
                );
                i += 2;
            }
            match kw(i).as_deref() {
                Some("LOGICAL") => {
                    return Err("waltail serves physical replication only, not LOGICAL".into())
                }
                Some("PHYSICAL") => i += 1,
                _ => {}
            }
            let start: Lsn = w
                .get(i)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("START_REPLICATION needs a start position X/X: {shown:?}"))?;
            i += 1;
            let mut tli = None;
            if kw(i).as_deref() == Some("TIMELINE") {
                tli = Some(timeline(w.get(i + 1))?);
                i += 2;
            }
            if i != w.len() {
                return Err(format!("unexpected words after START_REPLICATION: {shown:?}"));
            }
            Ok(Command::StartReplication {
                slot,
                start,
                timeline: tli,
            })
        }
        _ => Err(format!(
            "waltail's walsender serves IDENTIFY_SYSTEM, TIMELINE_HISTORY and START_REPLICATION PHYSICAL only, not {shown:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_walreceiver_sends_parses() {
        assert_eq!(parse("IDENTIFY_SYSTEM").unwrap(), Command::IdentifySystem);
        assert_eq!(
            parse("TIMELINE_HISTORY 2").unwrap(),
            Command::TimelineHistory(TimelineId(2))
        );
        // PostgreSQL 13 and 14, no slot.
        assert_eq!(
            parse("START_REPLICATION 0/3000000 TIMELINE 1").unwrap(),
            Command::StartReplication {
                slot: None,
                start: Lsn(0x300_0000),
                timeline: Some(TimelineId(1))
            }
        );
        // 15+: the slot name quoted.
        assert_eq!(
            parse("START_REPLICATION SLOT \"my \"\"slot\" PHYSICAL 1/A000000 TIMELINE 3;").unwrap(),
            Command::StartReplication {
                slot: Some("my \"slot".into()),
                start: Lsn(0x1_0A00_0000),
                timeline: Some(TimelineId(3))
            }
        );
        assert_eq!(
            parse("start_replication physical 0/0").unwrap(),
            Command::StartReplication {
                slot: None,
                start: Lsn(0),
                timeline: None
            }
        );
    }

    #[test]
    fn anything_else_is_refused_with_what_it_was() {
        for (q, what) in [
            ("SELECT 1", "not \"SELECT 1\""),
            (
                "START_REPLICATION SLOT s LOGICAL 0/0",
                "physical replication only",
            ),
            ("START_REPLICATION 0/0 TIMELINE x", "not a timeline ID"),
            ("START_REPLICATION 0/0 TIMELINE 0", "not a timeline ID"),
            ("START_REPLICATION zz", "start position"),
            ("START_REPLICATION 0/0 TIMELINE 1 extra", "unexpected words"),
            ("START_REPLICATION SLOT \"x", "unterminated"),
            ("TIMELINE_HISTORY", "serves IDENTIFY_SYSTEM"),
        ] {
            let e = parse(q).unwrap_err();
            assert!(e.contains(what), "{q}: {e}");
        }
    }
}
