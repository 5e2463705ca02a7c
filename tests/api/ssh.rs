//! Syncs over ssh against a real sshd the test starts: a deploy key by credential name,
//! host keys enforced with HIVESYNC_SSH_KNOWN_HOSTS, and refusals as repo_auth_failed.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::{GitRepo, TestApp, assert_exact_tree, scopes_file, wait_until};

struct Sshd {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    let status = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "hivesync-test", "-f"])
        .arg(path)
        .status()
        .expect("ssh-keygen runs");
    assert!(status.success());
}

impl Sshd {
    /// `None` (with a notice) where sshd cannot run: not installed, or not root.
    async fn start() -> Option<Sshd> {
        let sshd = PathBuf::from("/usr/sbin/sshd");
        let root = Command::new("id")
            .arg("-u")
            .output()
            .ok()
            .is_some_and(|o| o.stdout.starts_with(b"0"));
        if !sshd.exists() || !root {
            crate::skips::skip("needs /usr/sbin/sshd and root");
            return None;
        }
        let dir = tempfile::tempdir().expect("temp dir");
        keygen(&dir.path().join("host_key"));
        keygen(&dir.path().join("client_key"));
        std::fs::copy(
            dir.path().join("client_key.pub"),
            dir.path().join("authorized_keys"),
        )
        .expect("authorize");
        std::fs::create_dir_all("/run/sshd").expect("privilege separation dir");
        // sshd cannot report a port it chose, so one is picked here and handed over
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let config = format!(
            "ListenAddress 127.0.0.1\nPort {port}\nHostKey {dir}/host_key\nAuthorizedKeysFile {dir}/authorized_keys\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nPidFile {dir}/sshd.pid\n",
            dir = dir.path().display()
        );
        std::fs::write(dir.path().join("sshd_config"), config).expect("config");
        let child = Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(dir.path().join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sshd starts");
        let listening = wait_until(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .ok()
                .map(|_| ())
        })
        .await;
        assert!(listening.is_some(), "sshd listens");
        Some(Sshd { child, port, dir })
    }

    fn known_hosts(&self) -> String {
        let key = std::fs::read_to_string(self.dir.path().join("host_key.pub")).expect("host key");
        let mut parts = key.split_whitespace();
        format!(
            "[127.0.0.1]:{} {} {}\n",
            self.port,
            parts.next().expect("type"),
            parts.next().expect("key")
        )
    }

    fn url(&self, repo: &GitRepo) -> String {
        format!(
            "ssh://root@127.0.0.1:{}{}",
            self.port,
            repo.path().display()
        )
    }
}

async fn register_with_credential(app: &TestApp, url: &str, credential: &str) -> String {
    let response = app
        .post(
            "/api/v1/projects",
            &app.token,
            json!({"name": "ssh", "repo_url": url, "credential": credential}),
        )
        .await;
    assert_eq!(response.status(), 201);
    response.json::<Value>().await.expect("json")["project_id"]
        .as_str()
        .expect("id")
        .to_owned()
}

#[tokio::test]
async fn ssh_with_a_deploy_key_and_enforced_host_keys() {
    let Some(sshd) = Sshd::start().await else {
        return;
    };
    let repo = GitRepo::new();
    repo.write("over-ssh.txt", "hello over ssh\n");
    let commit = repo.commit("ssh");

    let secrets = tempfile::tempdir().expect("temp dir");
    std::fs::copy(
        sshd.dir.path().join("client_key"),
        secrets.path().join("deploy-key"),
    )
    .expect("secret");
    let stranger = tempfile::tempdir().expect("temp dir");
    keygen(&stranger.path().join("key"));
    std::fs::copy(
        stranger.path().join("key"),
        secrets.path().join("wrong-key"),
    )
    .expect("secret");
    let known_hosts = secrets.path().join("known_hosts");
    std::fs::write(&known_hosts, sshd.known_hosts()).expect("known_hosts");
    let secrets_dir = secrets.path().to_path_buf();
    let known = known_hosts.clone();
    let scopes = scopes_file(
        secrets.path(),
        "alice",
        &["deploy-key", "wrong-key", "not-configured"],
    );
    let app = TestApp::spawn_with(|config| {
        config.secrets_dir = Some(secrets_dir);
        config.credential_scopes = Some(scopes);
        config.ssh_known_hosts = Some(known);
        config.retry_max = 1;
    })
    .await;

    let id = register_with_credential(&app, &sshd.url(&repo), "deploy-key").await;
    let record = app.sync_to_end(&id).await;
    assert_eq!(record["status"], "completed", "{record}");
    assert_exact_tree(&app, &id, &repo, &commit);
    assert!(
        std::fs::read_dir(std::env::temp_dir())
            .expect("tmp")
            .flatten()
            .all(|e| !e.file_name().to_string_lossy().starts_with("hivesync-key-")),
        "the key file is deleted after the sync"
    );

    let refused = register_with_credential(&app, &sshd.url(&repo), "wrong-key").await;
    let record = app.sync_to_end(&refused).await;
    assert_eq!(record["error"]["code"], "repo_auth_failed", "{record}");

    let unknown = register_with_credential(&app, &sshd.url(&repo), "not-configured").await;
    let record = app.sync_to_end(&unknown).await;
    assert_eq!(record["error"]["code"], "repo_auth_failed", "{record}");
    assert!(
        record["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("HIVESYNC_SECRET_NOT_CONFIGURED"))
    );

    // a host key that does not match known_hosts is refused
    std::fs::write(
        &known_hosts,
        format!(
            "[127.0.0.1]:{} {}",
            sshd.port,
            std::fs::read_to_string(stranger.path().join("key.pub")).expect("pub")
        ),
    )
    .expect("rewrite known_hosts");
    let spoofed = register_with_credential(&app, &sshd.url(&repo), "deploy-key").await;
    let record = app.sync_to_end(&spoofed).await;
    assert_eq!(record["error"]["code"], "repo_auth_failed", "{record}");
    app.stop().await;
}
