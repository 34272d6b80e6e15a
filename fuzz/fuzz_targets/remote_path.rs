//! `RemotePath::parse` on arbitrary text: never panics, and whatever it accepts is returned unchanged, is at most
//! 4096 bytes, has no control character, and is relative with normal components only (no `..`, `.`, empty or
//! absolute part), so joined to a root it stays under it.
#![no_main]

use std::path::{Component, Path};

use ferry::path::RemotePath;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(path) = RemotePath::parse(raw) else {
        return;
    };
    assert_eq!(path.as_str(), raw);
    assert!(raw.len() <= ferry::path::MAX_PATH_LEN);
    assert!(!raw.chars().any(char::is_control));
    assert!(!raw.split('/').next().unwrap_or("").eq_ignore_ascii_case(".ferry"));
    let std_path = Path::new(raw);
    assert!(std_path.components().all(|c| matches!(c, Component::Normal(_))), "{raw:?}");
    assert_eq!(std_path.components().count(), path.components().count(), "{raw:?}");
    assert!(Path::new("/srv/root").join(std_path).starts_with("/srv/root"));
});
