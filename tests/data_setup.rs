//! The setup pipeline without the network: a package is verified, unpacked, its members verified
//! and renamed into place; a wrong package or member hash is refused with both hashes named and
//! leaves nothing in the cache.

use std::path::Path;

use mergeattack_harness::setup::{self, Artifact, CacheState, Client, Member, PackageKind};

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn sha(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("x");
    std::fs::write(&p, bytes).unwrap();
    setup::sha256_file(&p).unwrap()
}

/// An npm-style tarball holding `package/data/a.txt` and `package/b.bin`, made by the system `tar`.
fn tarball() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("package/data")).unwrap();
    std::fs::write(dir.path().join("package/data/a.txt"), b"alpha\n").unwrap();
    std::fs::write(dir.path().join("package/b.bin"), [0u8, 1, 2, 3]).unwrap();
    let st = std::process::Command::new("tar")
        .args(["czf", "p.tgz", "package/data/a.txt", "package/b.bin"])
        .current_dir(dir.path())
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::read(dir.path().join("p.tgz")).unwrap()
}

fn artifact(pkg_sha: &str, a_sha: &str) -> &'static Artifact {
    let members: &'static [Member] = Box::leak(Box::new([
        Member { path: "package/data/a.txt", file: "a.txt", sha256: leak(a_sha.to_string()) },
        Member { path: "package/b.bin", file: "b.bin", sha256: leak(sha(&[0, 1, 2, 3])) },
    ]));
    Box::leak(Box::new(Artifact {
        name: "fake",
        client: Client::Npm { spec: "fake@1.0.0" },
        version: "1.0.0",
        kind: PackageKind::NpmTarball,
        package_file: "fake-1.0.0.tgz",
        sha256: leak(pkg_sha.to_string()),
        dir: "data/fake",
        members,
    }))
}

fn write_pkg(dir: &Path, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join("fake-1.0.0.tgz");
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn verified_package_is_unpacked_into_the_cache() {
    let pkg = tarball();
    let a = artifact(&sha(&pkg), &sha(b"alpha\n"));
    let cache = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    assert_eq!(setup::check(cache.path(), a), CacheState::Incomplete(vec!["a.txt", "b.bin"]));
    setup::install_package(cache.path(), a, &write_pkg(scratch.path(), &pkg), scratch.path()).unwrap();
    assert_eq!(setup::check(cache.path(), a), CacheState::Ready);
    assert_eq!(std::fs::read(cache.path().join("data/fake/a.txt")).unwrap(), b"alpha\n");
    // A corrupted cache file is noticed (and would be fetched again).
    std::fs::write(cache.path().join("data/fake/b.bin"), b"xx").unwrap();
    assert_eq!(setup::check(cache.path(), a), CacheState::Incomplete(vec!["b.bin"]));
}

#[test]
fn package_hash_mismatch_is_refused_naming_both_hashes() {
    let pkg = tarball();
    let wrong = "0".repeat(64);
    let a = artifact(&wrong, &sha(b"alpha\n"));
    let cache = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let e = setup::install_package(cache.path(), a, &write_pkg(scratch.path(), &pkg), scratch.path()).unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "SHA-256 mismatch for the package fake-1.0.0.tgz of fake: expected {wrong}, got {}; refusing to use it",
            sha(&pkg)
        )
    );
    assert!(!cache.path().join("data/fake").exists(), "nothing written to the cache");
}

#[test]
fn member_hash_mismatch_is_refused_and_nothing_is_moved() {
    let pkg = tarball();
    let a = artifact(&sha(&pkg), &"1".repeat(64));
    let cache = tempfile::tempdir().unwrap();
    let scratch = tempfile::tempdir().unwrap();
    let e = setup::install_package(cache.path(), a, &write_pkg(scratch.path(), &pkg), scratch.path()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.starts_with("SHA-256 mismatch for the file package/data/a.txt of fake: expected 1111"), "{msg}");
    assert!(msg.contains(&sha(b"alpha\n")), "{msg}");
    assert!(!cache.path().join("data/fake").exists());
}

#[test]
fn unknown_artifact_lists_the_known_ones() {
    let e = setup::run(Path::new("/nonexistent-cache"), &["cifar".to_string()]).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown artifact `cifar` (known: onnxruntime, fashion-mnist, mnist, optdigits, animals, emoji, textures)"
    );
}
