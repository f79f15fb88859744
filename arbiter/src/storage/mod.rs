//! Durable Raft storage: a checksummed write-ahead log, a snapshot file and a
//! data-dir identity stamp, with an in-memory copy of the live log suffix that
//! implements raft-rs's [`raft::Storage`].
//!
//! Files in the data dir:
//! - `identity.json` — `{"cluster_id": .., "node_id": .., "format": 1}`; a
//!   data dir of another cluster or node is refused.
//! - `snapshot.bin` — one record (kind 4): protobuf `eraftpb::Snapshot` whose
//!   data is the serialized state machine. Replaced atomically.
//! - `wal.log` — records (kind 1 `Entry`, 2 `HardState`, 3 base `(index, term)`),
//!   rewritten atomically after each snapshot so the log stays bounded.

pub mod wal;

use std::path::{Path, PathBuf};

use protobuf::Message as _;
use raft::eraftpb::{ConfState, Entry, HardState, Snapshot};
use raft::{GetEntriesContext, RaftState, Storage};
use serde::{Deserialize, Serialize};

use wal::{WalError, WalWriter, KIND_BASE, KIND_ENTRY, KIND_HARD_STATE, KIND_SNAPSHOT};

const IDENTITY_FILE: &str = "identity.json";
const SNAPSHOT_FILE: &str = "snapshot.bin";
const WAL_FILE: &str = "wal.log";
const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error(transparent)]
    Wal(#[from] WalError),
    #[error("data dir {dir} belongs to cluster {found_cluster:?} node {found_node}, not cluster {cluster:?} node {node}; refusing to use it")]
    WrongIdentity {
        dir: PathBuf,
        found_cluster: String,
        found_node: u64,
        cluster: String,
        node: u64,
    },
    #[error("{path}: unreadable identity stamp: {reason}")]
    BadIdentity { path: PathBuf, reason: String },
    #[error("{path}: record at byte offset {offset} does not decode: {reason}")]
    Undecodable {
        path: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("{path}: inconsistent log: {reason}")]
    Inconsistent { path: PathBuf, reason: String },
    #[error("encoding a record failed: {0}")]
    Encode(String),
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Identity {
    cluster_id: String,
    node_id: u64,
    format: u32,
}

/// Raft log, hard state and latest snapshot, durable in a data dir.
pub struct DiskStorage {
    wal_path: PathBuf,
    snapshot_path: PathBuf,
    hard_state: HardState,
    /// Latest snapshot (local or received), data included; index 0 when none.
    snapshot: Snapshot,
    /// Entries after the snapshot index, contiguous.
    entries: Vec<Entry>,
    wal: WalWriter,
}

fn encode<M: protobuf::Message>(m: &M) -> Result<Vec<u8>, StorageError> {
    m.write_to_bytes()
        .map_err(|e| StorageError::Encode(e.to_string()))
}

impl DiskStorage {
    /// Opens (creating if needed) the data dir of node `node_id` in cluster `cluster_id`
    /// and replays snapshot and log.
    pub fn open(dir: &Path, cluster_id: &str, node_id: u64) -> Result<Self, StorageError> {
        std::fs::create_dir_all(dir).map_err(wal::io_err(dir))?;
        check_identity(dir, cluster_id, node_id)?;
        let snapshot_path = dir.join(SNAPSHOT_FILE);
        let wal_path = dir.join(WAL_FILE);

        let snapshot = match wal::read_file(&snapshot_path)? {
            None => Snapshot::default(),
            Some(bytes) => {
                let scan = wal::scan(&snapshot_path, &bytes)?;
                if scan.valid_len != bytes.len() as u64 || scan.records.len() != 1 {
                    // The snapshot file is only ever replaced whole, so any tail is damage.
                    return Err(WalError::Corrupt {
                        path: snapshot_path,
                        offset: scan.valid_len,
                        reason: "snapshot file is not exactly one complete record".into(),
                    }
                    .into());
                }
                let rec = &scan.records[0];
                if rec.kind != KIND_SNAPSHOT {
                    return Err(StorageError::Undecodable {
                        path: snapshot_path,
                        offset: 0,
                        reason: format!("kind {} is not a snapshot", rec.kind),
                    });
                }
                Snapshot::parse_from_bytes(rec.body).map_err(|e| StorageError::Undecodable {
                    path: snapshot_path.clone(),
                    offset: 0,
                    reason: e.to_string(),
                })?
            }
        };

        let wal_bytes = wal::read_file(&wal_path)?.unwrap_or_default();
        let scan = wal::scan(&wal_path, &wal_bytes)?;
        let mut hard_state = HardState::default();
        let mut log: Vec<Entry> = Vec::new();
        let mut base: Option<(u64, u64)> = None;
        for rec in &scan.records {
            let undecodable = |reason: String| StorageError::Undecodable {
                path: wal_path.clone(),
                offset: rec.offset,
                reason,
            };
            match rec.kind {
                KIND_ENTRY => {
                    let e = Entry::parse_from_bytes(rec.body)
                        .map_err(|e| undecodable(e.to_string()))?;
                    // Same semantics as the live append: a new entry replaces the suffix from its index.
                    if let Some(first) = log.first().map(|f| f.index) {
                        if e.index < first {
                            log.clear();
                        } else {
                            let last = first + log.len() as u64 - 1;
                            if e.index > last + 1 {
                                return Err(StorageError::Inconsistent {
                                    path: wal_path.clone(),
                                    reason: format!(
                                        "entry {} at offset {} leaves a gap after {}",
                                        e.index, rec.offset, last
                                    ),
                                });
                            }
                            log.truncate((e.index - first) as usize);
                        }
                    }
                    log.push(e);
                }
                KIND_HARD_STATE => {
                    hard_state = HardState::parse_from_bytes(rec.body)
                        .map_err(|e| undecodable(e.to_string()))?;
                }
                KIND_BASE => {
                    let b: [u8; 16] = rec
                        .body
                        .try_into()
                        .map_err(|_| undecodable("base record is not 16 bytes".into()))?;
                    base = Some((
                        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
                        u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
                    ));
                }
                other => return Err(undecodable(format!("unknown record kind {other}"))),
            }
        }

        // Keep only log entries that continue the snapshot (see module docs of wal.rs and
        // docs/arbiter.md): if the snapshot is newer than what this log was built on, the
        // log suffix may belong to a diverged history and is discarded.
        let snap_index = snapshot.get_metadata().index;
        let snap_term = snapshot.get_metadata().term;
        if snap_index > 0 {
            let continues = base == Some((snap_index, snap_term))
                || log
                    .iter()
                    .any(|e| e.index == snap_index && e.term == snap_term);
            if continues {
                log.retain(|e| e.index > snap_index);
            } else {
                log.clear();
            }
        }
        if let Some(first) = log.first() {
            let expected = snap_index + 1;
            if first.index != expected {
                return Err(StorageError::Inconsistent {
                    path: wal_path.clone(),
                    reason: format!(
                        "log starts at {} but the snapshot ends at {}",
                        first.index, snap_index
                    ),
                });
            }
        }
        let last_index = snap_index + log.len() as u64;
        // The commit index is written lazily (unsynced); it can lag the snapshot but never exceed the log.
        hard_state.commit = hard_state.commit.max(snap_index).min(last_index);
        hard_state.term = hard_state.term.max(snap_term);

        let wal = WalWriter::open(&wal_path, scan.valid_len)?;
        tracing::info!(
            snapshot_index = snap_index,
            last_index,
            term = hard_state.term,
            commit = hard_state.commit,
            "storage recovered"
        );
        Ok(DiskStorage {
            wal_path,
            snapshot_path,
            hard_state,
            snapshot,
            entries: log,
            wal,
        })
    }

    /// True when this node has any Raft state (a snapshot or log entries).
    pub fn is_initialized(&self) -> bool {
        self.snapshot.get_metadata().index > 0 || !self.entries.is_empty()
    }

    /// Creates the initial cluster configuration as a snapshot at index 1, term 1,
    /// so nodes added later (empty logs) are brought up through a snapshot.
    pub fn bootstrap(
        &mut self,
        voters: Vec<u64>,
        state_machine: Vec<u8>,
    ) -> Result<(), StorageError> {
        let mut snap = Snapshot::default();
        snap.set_data(state_machine.into());
        let meta = snap.mut_metadata();
        meta.index = 1;
        meta.term = 1;
        meta.mut_conf_state().voters = voters;
        self.install_snapshot(snap)
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    pub fn snapshot_ref(&self) -> &Snapshot {
        &self.snapshot
    }

    pub fn first_index_u64(&self) -> u64 {
        self.snapshot.get_metadata().index + 1
    }

    pub fn last_index_u64(&self) -> u64 {
        self.snapshot.get_metadata().index + self.entries.len() as u64
    }

    /// Appends entries (replacing any conflicting suffix); durable after [`Self::sync`].
    pub fn append(&mut self, ents: &[Entry]) -> Result<(), StorageError> {
        let Some(first_new) = ents.first().map(|e| e.index) else {
            return Ok(());
        };
        let first = self.first_index_u64();
        let last = self.last_index_u64();
        if first_new < first || first_new > last + 1 {
            return Err(StorageError::Inconsistent {
                path: self.wal_path.clone(),
                reason: format!("append of {first_new} outside [{first}, {}]", last + 1),
            });
        }
        for e in ents {
            self.wal.append(KIND_ENTRY, &encode(e)?);
        }
        self.entries.truncate((first_new - first) as usize);
        self.entries.extend_from_slice(ents);
        Ok(())
    }

    /// Records a new hard state; durable after [`Self::sync`].
    pub fn set_hard_state(&mut self, hs: &HardState) -> Result<(), StorageError> {
        self.wal.append(KIND_HARD_STATE, &encode(hs)?);
        self.hard_state = hs.clone();
        Ok(())
    }

    /// Records a commit index advance. Not synced by itself: commit can be re-learnt.
    pub fn set_commit(&mut self, commit: u64) -> Result<(), StorageError> {
        let mut hs = self.hard_state.clone();
        hs.commit = commit;
        self.set_hard_state(&hs)
    }

    /// Writes buffered records and fsyncs them.
    pub fn sync(&mut self) -> Result<(), StorageError> {
        Ok(self.wal.flush(true)?)
    }

    /// Writes buffered records without fsync (for records whose loss is harmless).
    pub fn flush_unsynced(&mut self) -> Result<(), StorageError> {
        if self.wal.has_pending() {
            self.wal.flush(false)?;
        }
        Ok(())
    }

    /// Installs a snapshot received from the leader (or the bootstrap one): durable on return.
    pub fn install_snapshot(&mut self, snap: Snapshot) -> Result<(), StorageError> {
        let meta = snap.get_metadata();
        if meta.index < self.snapshot.get_metadata().index {
            return Err(StorageError::Inconsistent {
                path: self.snapshot_path.clone(),
                reason: format!(
                    "snapshot at {} is older than the stored one at {}",
                    meta.index,
                    self.snapshot.get_metadata().index
                ),
            });
        }
        let mut hs = self.hard_state.clone();
        hs.term = hs.term.max(meta.term);
        hs.commit = meta.index;
        // raft-rs only sends a snapshot when our log lacks (index, term), so nothing after it
        // can be trusted: drop the whole log, as raft-rs's own MemStorage does.
        self.write_snapshot_file(&snap)?;
        self.snapshot = snap;
        self.entries.clear();
        self.hard_state = hs;
        self.rewrite_wal()
    }

    /// Replaces the log prefix up to `index` (applied) by a snapshot of the state machine.
    pub fn compact(
        &mut self,
        index: u64,
        conf_state: ConfState,
        data: Vec<u8>,
    ) -> Result<(), StorageError> {
        let term = self.term(index).map_err(|e| StorageError::Inconsistent {
            path: self.wal_path.clone(),
            reason: format!("cannot snapshot at {index}: {e}"),
        })?;
        let mut snap = Snapshot::default();
        snap.set_data(data.into());
        let meta = snap.mut_metadata();
        meta.index = index;
        meta.term = term;
        meta.set_conf_state(conf_state);
        self.write_snapshot_file(&snap)?;
        let first = self.first_index_u64();
        self.entries.drain(..(index + 1 - first) as usize);
        self.snapshot = snap;
        self.rewrite_wal()
    }

    fn write_snapshot_file(&self, snap: &Snapshot) -> Result<(), StorageError> {
        let mut bytes = Vec::new();
        wal::encode_record(&mut bytes, KIND_SNAPSHOT, &encode(snap)?);
        Ok(wal::write_atomically(&self.snapshot_path, &bytes)?)
    }

    /// Atomically replaces the WAL by: base (snapshot index, term), hard state, live entries.
    fn rewrite_wal(&mut self) -> Result<(), StorageError> {
        self.wal.flush(false)?;
        let meta = self.snapshot.get_metadata();
        let mut base = [0u8; 16];
        base[..8].copy_from_slice(&meta.index.to_le_bytes());
        base[8..].copy_from_slice(&meta.term.to_le_bytes());
        let mut bytes = Vec::new();
        wal::encode_record(&mut bytes, KIND_BASE, &base);
        wal::encode_record(&mut bytes, KIND_HARD_STATE, &encode(&self.hard_state)?);
        for e in &self.entries {
            wal::encode_record(&mut bytes, KIND_ENTRY, &encode(e)?);
        }
        wal::write_atomically(&self.wal_path, &bytes)?;
        self.wal = WalWriter::open(&self.wal_path, bytes.len() as u64)?;
        Ok(())
    }

    fn compacted_or_unavailable(&self, idx: u64) -> raft::Error {
        if idx < self.first_index_u64() {
            raft::Error::Store(raft::StorageError::Compacted)
        } else {
            raft::Error::Store(raft::StorageError::Unavailable)
        }
    }
}

fn check_identity(dir: &Path, cluster_id: &str, node_id: u64) -> Result<(), StorageError> {
    let path = dir.join(IDENTITY_FILE);
    let wanted = Identity {
        cluster_id: cluster_id.to_owned(),
        node_id,
        format: FORMAT_VERSION,
    };
    match wal::read_file(&path)? {
        None => {
            let json = serde_json::to_vec_pretty(&wanted)
                .map_err(|e| StorageError::Encode(e.to_string()))?;
            wal::write_atomically(&path, &json)?;
            Ok(())
        }
        Some(bytes) => {
            let found: Identity =
                serde_json::from_slice(&bytes).map_err(|e| StorageError::BadIdentity {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            if found.format != FORMAT_VERSION {
                return Err(StorageError::BadIdentity {
                    path,
                    reason: format!("format {} is not {}", found.format, FORMAT_VERSION),
                });
            }
            if found != wanted {
                return Err(StorageError::WrongIdentity {
                    dir: dir.to_owned(),
                    found_cluster: found.cluster_id,
                    found_node: found.node_id,
                    cluster: cluster_id.to_owned(),
                    node: node_id,
                });
            }
            Ok(())
        }
    }
}

impl Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        Ok(RaftState::new(
            self.hard_state.clone(),
            self.snapshot.get_metadata().get_conf_state().clone(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        let first = self.first_index_u64();
        if low < first {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > self.last_index_u64() + 1 || low > high {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        let mut ents = self.entries[(low - first) as usize..(high - first) as usize].to_vec();
        raft::util::limit_size(&mut ents, max_size.into());
        Ok(ents)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let meta = self.snapshot.get_metadata();
        if idx == meta.index {
            return Ok(meta.term);
        }
        let first = self.first_index_u64();
        if idx < first || idx > self.last_index_u64() {
            return Err(self.compacted_or_unavailable(idx));
        }
        Ok(self.entries[(idx - first) as usize].term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first_index_u64())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last_index_u64())
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.snapshot.get_metadata().index < request_index {
            return Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable,
            ));
        }
        Ok(self.snapshot.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(index: u64, term: u64, data: &[u8]) -> Entry {
        Entry {
            index,
            term,
            data: data.to_vec().into(),
            ..Default::default()
        }
    }

    fn hs(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..Default::default()
        }
    }

    #[test]
    fn log_and_hard_state_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), "c", 1).unwrap();
            s.bootstrap(vec![1, 2, 3], b"sm".to_vec()).unwrap();
            s.append(&[entry(2, 1, b"a"), entry(3, 1, b"b"), entry(4, 1, b"c")])
                .unwrap();
            // A new leader overwrites the suffix from 3.
            s.append(&[entry(3, 2, b"x")]).unwrap();
            s.set_hard_state(&hs(2, 3, 3)).unwrap();
            s.sync().unwrap();
        }
        let s = DiskStorage::open(dir.path(), "c", 1).unwrap();
        assert_eq!(s.first_index_u64(), 2);
        assert_eq!(s.last_index_u64(), 3);
        assert_eq!(s.term(3).unwrap(), 2);
        assert_eq!(s.term(1).unwrap(), 1);
        assert_eq!(*s.hard_state(), hs(2, 3, 3));
        assert_eq!(s.initial_state().unwrap().conf_state.voters, vec![1, 2, 3]);
        assert_eq!(&s.snapshot_ref().data[..], b"sm");
        let ents = s
            .entries(2, 4, None, GetEntriesContext::empty(false))
            .unwrap();
        assert_eq!(&ents[1].data[..], b"x");
    }

    #[test]
    fn compaction_keeps_suffix_and_bounds_the_wal() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), "c", 1).unwrap();
            s.bootstrap(vec![1], Vec::new()).unwrap();
            let ents: Vec<Entry> = (2..200).map(|i| entry(i, 1, &[0u8; 100])).collect();
            s.append(&ents).unwrap();
            s.set_hard_state(&hs(1, 1, 199)).unwrap();
            s.sync().unwrap();
            let before = std::fs::metadata(dir.path().join(WAL_FILE)).unwrap().len();
            s.compact(
                190,
                s.snapshot_ref().get_metadata().get_conf_state().clone(),
                b"at190".to_vec(),
            )
            .unwrap();
            let after = std::fs::metadata(dir.path().join(WAL_FILE)).unwrap().len();
            assert!(after < before / 10, "wal {before} -> {after}");
            assert!(matches!(
                s.term(100),
                Err(raft::Error::Store(raft::StorageError::Compacted))
            ));
        }
        let s = DiskStorage::open(dir.path(), "c", 1).unwrap();
        assert_eq!(s.first_index_u64(), 191);
        assert_eq!(s.last_index_u64(), 199);
        assert_eq!(s.term(190).unwrap(), 1);
        assert_eq!(&s.snapshot_ref().data[..], b"at190");
    }

    #[test]
    fn received_snapshot_discards_a_diverged_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DiskStorage::open(dir.path(), "c", 2).unwrap();
        s.bootstrap(vec![1, 2, 3], Vec::new()).unwrap();
        s.append(&[entry(2, 1, b"a"), entry(3, 1, b"b")]).unwrap();
        s.sync().unwrap();
        let mut snap = Snapshot::default();
        snap.mut_metadata().index = 10;
        snap.mut_metadata().term = 3;
        snap.set_data(b"leader".to_vec().into());
        s.install_snapshot(snap).unwrap();
        assert_eq!(s.last_index_u64(), 10);
        drop(s);
        let s = DiskStorage::open(dir.path(), "c", 2).unwrap();
        assert_eq!(s.first_index_u64(), 11);
        assert_eq!(s.hard_state().commit, 10);
        assert_eq!(&s.snapshot_ref().data[..], b"leader");
    }

    #[test]
    fn data_dir_of_another_cluster_or_node_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        DiskStorage::open(dir.path(), "alpha", 1).unwrap();
        let msg = DiskStorage::open(dir.path(), "beta", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("alpha") && msg.contains("beta"), "{msg}");
        assert!(DiskStorage::open(dir.path(), "alpha", 2).is_err());
    }

    #[test]
    fn corrupt_acknowledged_record_is_an_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), "c", 1).unwrap();
            s.bootstrap(vec![1], Vec::new()).unwrap();
            s.append(&[entry(2, 1, b"payload-two"), entry(3, 1, b"payload-three")])
                .unwrap();
            s.sync().unwrap();
        }
        let wal_path = dir.path().join(WAL_FILE);
        let mut bytes = std::fs::read(&wal_path).unwrap();
        let at = bytes.windows(11).position(|w| w == b"payload-two").unwrap();
        bytes[at] ^= 0xff;
        std::fs::write(&wal_path, &bytes).unwrap();
        let msg = DiskStorage::open(dir.path(), "c", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(msg.contains("wal.log") && msg.contains("offset"), "{msg}");
        // Nothing was truncated.
        assert_eq!(std::fs::read(&wal_path).unwrap(), bytes);
    }

    #[test]
    fn crash_between_snapshot_file_and_wal_rewrite_keeps_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let wal_path = dir.path().join(WAL_FILE);
        let old_wal;
        {
            let mut s = DiskStorage::open(dir.path(), "c", 1).unwrap();
            s.bootstrap(vec![1], Vec::new()).unwrap();
            let ents: Vec<Entry> = (2..=10).map(|i| entry(i, 1, b"x")).collect();
            s.append(&ents).unwrap();
            s.set_hard_state(&hs(1, 1, 10)).unwrap();
            s.sync().unwrap();
            old_wal = std::fs::read(&wal_path).unwrap();
            let cs = s.snapshot_ref().get_metadata().get_conf_state().clone();
            s.compact(5, cs, b"at5".to_vec()).unwrap();
        }
        // The crash: the new snapshot is on disk, the WAL is still the old one.
        std::fs::write(&wal_path, &old_wal).unwrap();
        let s = DiskStorage::open(dir.path(), "c", 1).unwrap();
        assert_eq!(s.first_index_u64(), 6);
        assert_eq!(s.last_index_u64(), 10);
        assert_eq!(&s.snapshot_ref().data[..], b"at5");
    }

    #[test]
    fn crash_after_receiving_a_snapshot_drops_the_unrelated_log() {
        let dir = tempfile::tempdir().unwrap();
        let wal_path = dir.path().join(WAL_FILE);
        let old_wal;
        {
            let mut s = DiskStorage::open(dir.path(), "c", 2).unwrap();
            s.bootstrap(vec![1, 2, 3], Vec::new()).unwrap();
            s.append(&[entry(2, 1, b"a"), entry(3, 1, b"b")]).unwrap();
            s.sync().unwrap();
            old_wal = std::fs::read(&wal_path).unwrap();
            let mut snap = Snapshot::default();
            snap.mut_metadata().index = 20;
            snap.mut_metadata().term = 3;
            s.install_snapshot(snap).unwrap();
        }
        std::fs::write(&wal_path, &old_wal).unwrap();
        let s = DiskStorage::open(dir.path(), "c", 2).unwrap();
        assert_eq!(s.first_index_u64(), 21);
        assert_eq!(s.last_index_u64(), 20);
        assert_eq!(s.hard_state().commit, 20);
    }

    #[test]
    fn corrupt_snapshot_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), "c", 1).unwrap();
            s.bootstrap(vec![1], b"state-machine-bytes".to_vec())
                .unwrap();
        }
        let path = dir.path().join(SNAPSHOT_FILE);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes.windows(5).position(|w| w == b"state").unwrap();
        bytes[at] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let msg = DiskStorage::open(dir.path(), "c", 1)
            .err()
            .unwrap()
            .to_string();
        assert!(
            msg.contains("snapshot.bin") && msg.contains("checksum"),
            "{msg}"
        );
    }

    #[test]
    fn torn_tail_is_dropped_and_appends_continue() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut s = DiskStorage::open(dir.path(), "c", 1).unwrap();
            s.bootstrap(vec![1], Vec::new()).unwrap();
            s.append(&[entry(2, 1, b"two"), entry(3, 1, b"three")])
                .unwrap();
            s.sync().unwrap();
        }
        let wal_path = dir.path().join(WAL_FILE);
        let len = std::fs::metadata(&wal_path).unwrap().len();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&wal_path)
            .unwrap();
        f.set_len(len - 2).unwrap();
        drop(f);
        {
            let mut s = DiskStorage::open(dir.path(), "c", 1).unwrap();
            assert_eq!(s.last_index_u64(), 2);
            s.append(&[entry(3, 1, b"again")]).unwrap();
            s.sync().unwrap();
        }
        let s = DiskStorage::open(dir.path(), "c", 1).unwrap();
        assert_eq!(s.last_index_u64(), 3);
    }
}
