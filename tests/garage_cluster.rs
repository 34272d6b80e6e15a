//! The Garage fixture itself (tests/util/garage.rs): the binary's cluster serves a test's prefix, and keeps
//! serving it through the loss of one node of three (replication 3 keeps a quorum), the property the object-store
//! tests lean on when they kill a node mid-push.

use crate::util::garage;

#[test]
fn the_cluster_serves_a_test_prefix_through_the_loss_of_one_node() {
    let Some(garage) = garage::cluster() else {
        return;
    };
    let prefix = garage.prefix("fixture");
    assert_ne!(prefix, garage.prefix("fixture"), "every call gives a fresh prefix");
    let dir = tempfile::tempdir().unwrap();
    let (one, two) = (dir.path().join("one"), dir.path().join("two"));
    std::fs::write(&one, b"before the kill").unwrap();
    std::fs::write(&two, b"while node 3 is down").unwrap();
    let bucket = garage.bucket();
    garage.s3(&["put", bucket, &format!("{prefix}/one"), one.to_str().unwrap()]);
    let down = garage.kill_node(3);
    garage.s3(&["put", bucket, &format!("{prefix}/two"), two.to_str().unwrap()]);
    assert_eq!(
        garage.s3(&["get", bucket, &format!("{prefix}/one")]),
        b"before the kill"
    );
    down.restart();
    assert_eq!(
        garage.s3(&["get", bucket, &format!("{prefix}/two")]),
        b"while node 3 is down"
    );
    let keys = garage.keys(&format!("{prefix}/"));
    assert_eq!(keys, [format!("{prefix}/one"), format!("{prefix}/two")]);
    assert!(garage
        .store_url("fixture")
        .starts_with(&format!("s3://{bucket}/fixture-")));
}
