//! A data directory is opened only by the node, group count and codec that created it:
//! anything else is refused with an error that says what differs, and nothing is written.
//! It is opened with the options lookups rely on.

use redpacket_node::storage::Store;
use redpacket_node::storage::StoreError;
use redpacket_node::storage::keys;

#[test]
fn a_data_directory_reopens_for_its_own_node_and_refuses_any_other() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), 1, 4).expect("a new directory"));
    drop(Store::open(dir.path(), 1, 4).expect("the same node again"));

    let err = Store::open(dir.path(), 2, 4).err().expect("another node id is refused");
    assert!(matches!(err, StoreError::WrongNode { stored: 1, configured: 2, .. }), "{err}");

    let err = Store::open(dir.path(), 1, 16).err().expect("another group count is refused");
    assert!(matches!(err, StoreError::WrongGroups { stored: 4, configured: 16, .. }), "{err}");
}

#[test]
fn a_data_directory_written_with_another_codec_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1, 4).unwrap();
    let cf = store.db().cf_handle(keys::CF_NODE).unwrap();
    // A directory from before the codec was recorded (JSON): identity, but no format.
    store.db().delete_cf(cf, keys::NODE_FORMAT).unwrap();
    drop(store);
    let err = Store::open(dir.path(), 1, 4).err().expect("refused");
    assert!(matches!(&err, StoreError::WrongFormat { stored, .. } if stored == "json"), "{err}");
    assert!(err.to_string().contains("empty data directory"), "the error says what to do: {err}");

    // One written by a codec this version does not know.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), 1, 4).unwrap();
    let cf = store.db().cf_handle(keys::CF_NODE).unwrap();
    store.db().put_cf(cf, keys::NODE_FORMAT, b"cbor-9").unwrap();
    drop(store);
    let err = Store::open(dir.path(), 1, 4).err().expect("refused");
    assert!(matches!(&err, StoreError::WrongFormat { stored, .. } if stored == "cbor-9"), "{err}");
}

/// Every first grab looks up a claim that does not exist yet, twice (the fast path, then
/// apply): the state family answers such lookups from bloom filters, in the memtable as on
/// disk, rather than searching. RocksDB records the options it opened with in `OPTIONS-*`.
#[test]
fn lookups_of_absent_state_keys_are_filtered_in_memory_and_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), 1, 4).unwrap());
    let options = std::fs::read_dir(dir.path().join("db"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("OPTIONS-"))
        .max()
        .expect("an OPTIONS file");
    let text = std::fs::read_to_string(options).unwrap();
    let section = |header: &str| -> String {
        let start = text.find(header).unwrap_or_else(|| panic!("{header} in OPTIONS"));
        let rest = &text[start + header.len()..];
        rest[..rest.find("\n[").unwrap_or(rest.len())].to_string()
    };
    let cf = section(&format!("[CFOptions \"{}\"]", keys::CF_SM));
    assert!(cf.contains("memtable_whole_key_filtering=true"), "{cf}");
    assert!(cf.contains("memtable_prefix_bloom_size_ratio=0.1"), "{cf}");
    let table = section(&format!("[TableOptions/BlockBasedTable \"{}\"]", keys::CF_SM));
    assert!(table.contains("filter_policy=bloomfilter"), "{table}");
    // The log family is read only for entries that exist: no filters to keep.
    let log = section(&format!("[CFOptions \"{}\"]", keys::CF_LOG));
    assert!(log.contains("memtable_prefix_bloom_size_ratio=0.000000"), "{log}");
}
