//! A data directory is opened only by the node, group count and codec that created it:
//! anything else is refused with an error that says what differs, and nothing is written.

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
