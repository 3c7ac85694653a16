//! The WAL format: everything waltail knows about the bytes PostgreSQL writes.
//!
//! * [`lsn`]: the `Lsn` type and page/alignment constants;
//! * [`segment`]: segment sizes, numbers, timelines and file names;
//! * [`page`]: page headers and their validation;
//! * [`record`]: record headers and CRC-32C;
//! * [`scan`]: reading records to find the valid end of WAL.
//!
//! Nothing here does I/O; callers hand in bytes. Nothing here panics on any
//! bytes it is given.

pub mod history;
pub mod lsn;
pub mod page;
pub mod record;
pub mod scan;
pub mod segment;
pub mod synth;

pub use lsn::{Lsn, XLOG_BLCKSZ};
pub use page::{PageChecker, PageError, PageHeader};
pub use record::RecordHeader;
pub use scan::{scan_segment, End, EndKind, ScanConfig, ScanSummary, Scanner, WalView};
pub use segment::{SegmentName, SegmentNo, SegmentSize, TimelineId, WalFileName};
