//! Throwaway PostgreSQL clusters: `initdb` into a temp dir, `wal_level=logical`, a free port, a
//! unix socket in the temp dir; stopped and removed on drop, even when the test panics.
//!
//! Server binaries come from `PG_BIN`, else `pg_config --bindir`, else the newest
//! `/usr/lib/postgresql/*/bin`. `initdb` refuses to run as root, so under root the cluster runs as
//! the unprivileged `postgres` account (override with `PG_OS_USER`) through `runuser`.
//! Host connections use SCRAM-SHA-256 (as RDS and Aurora do) with user `postgres`, password
//! [`SUPERUSER_PASSWORD`].

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};

/// The superuser's password on every throwaway cluster.
pub const SUPERUSER_PASSWORD: &str = "postgres";

/// Extra settings for a cluster.
#[derive(Debug, Clone, Default)]
pub struct ClusterOptions {
    /// Lines appended to postgresql.conf.
    pub extra_conf: Vec<String>,
    /// Replaces pg_hba.conf when set.
    pub hba: Option<String>,
    /// Files written into the data directory before start (name, contents, mode).
    pub data_files: Vec<(String, Vec<u8>, u32)>,
    /// Server binaries' directory; overrides `PG_BIN` and the search.
    pub pg_bin: Option<PathBuf>,
}

/// A running throwaway cluster.
pub struct PgCluster {
    bindir: PathBuf,
    dir: tempfile::TempDir,
    os_user: Option<String>,
    /// TCP port on 127.0.0.1.
    pub port: u16,
}

fn find_bindir(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = explicit
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("PG_BIN").map(PathBuf::from))
    {
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
        bail!(
            "PG_BIN={} holds no initdb: point PG_BIN at PostgreSQL's server binaries",
            dir.display()
        );
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").is_file() {
            return Ok(dir);
        }
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    found.retain(|d| d.join("initdb").is_file());
    found.sort();
    found.pop().ok_or_else(|| {
        anyhow::anyhow!(
            "PostgreSQL server binaries (initdb, pg_ctl) not found: install postgresql-15 \
             (apt-get install postgresql-15) or set PG_BIN to their directory"
        )
    })
}

/// The server binaries of PostgreSQL `major` that `scripts/pg-versions.sh` installs into the
/// repository's `.pg/<major>/bin` (`PG_VERSIONS_DIR` overrides `.pg`).
pub fn pg_bin_of(major: u32) -> anyhow::Result<PathBuf> {
    let root = std::env::var_os("PG_VERSIONS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.pg"));
    let dir = root.join(major.to_string()).join("bin");
    if dir.join("postgres").is_file() {
        return Ok(dir);
    }
    bail!(
        "PostgreSQL {major} is not installed in {}: run ./scripts/pg-versions.sh {major} (the README's \
         test command does)",
        dir.display()
    )
}

fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgCluster {
    /// Starts a cluster with default settings.
    pub fn start() -> anyhow::Result<Self> {
        Self::start_with(ClusterOptions::default())
    }

    /// Starts a cluster with extra settings.
    pub fn start_with(opts: ClusterOptions) -> anyhow::Result<Self> {
        let bindir = find_bindir(opts.pg_bin.as_deref())?;
        let dir = tempfile::Builder::new().prefix("pgcdc-test-").tempdir()?;
        let os_user = if is_root() {
            Some(std::env::var("PG_OS_USER").unwrap_or_else(|_| "postgres".into()))
        } else {
            None
        };
        let mut cluster = PgCluster {
            bindir,
            dir,
            os_user,
            port: 0,
        };
        cluster.init(&opts)?;
        cluster.start_on_free_port()?;
        Ok(cluster)
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the unix socket.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bindir.join(program);
        match &self.os_user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.arg("-u").arg(user).arg("--").arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, mut cmd: Command, what: &str) -> anyhow::Result<()> {
        let out = cmd.stdin(Stdio::null()).output().with_context(|| {
            format!("{what}: cannot run (is runuser available and the postgres account present?)")
        })?;
        if !out.status.success() {
            bail!(
                "{what} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn chown(&self, path: &Path) -> anyhow::Result<()> {
        if let Some(user) = &self.os_user {
            let status = Command::new("chown")
                .arg("-R")
                .arg(user)
                .arg(path)
                .status()?;
            if !status.success() {
                bail!("chown {user} {} failed", path.display());
            }
        }
        Ok(())
    }

    fn init(&mut self, opts: &ClusterOptions) -> anyhow::Result<()> {
        let root = self.dir.path();
        std::fs::create_dir_all(self.socket_dir())?;
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD)?;
        // The temp dir is root's 0700 by default; the server account must enter it.
        if self.os_user.is_some() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755))?;
        }
        self.chown(root)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(self.data_dir())
            .args([
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "-E",
                "UTF8",
            ])
            .arg("--locale=C")
            .arg(format!("--pwfile={}", pwfile.display()))
            .arg("--no-sync");
        self.run(initdb, "initdb")?;
        let mut conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\nwal_level = logical\n\
             max_replication_slots = 20\nmax_wal_senders = 20\nfsync = off\nfull_page_writes = off\n\
             shared_buffers = 32MB\nmax_connections = 60\n\
             log_min_messages = warning\nwal_sender_timeout = 60s\n",
            self.socket_dir().display()
        );
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        let data = self.data_dir();
        let mut existing = std::fs::read_to_string(data.join("postgresql.conf"))?;
        existing.push_str(&conf);
        std::fs::write(data.join("postgresql.conf"), existing)?;
        if let Some(hba) = &opts.hba {
            std::fs::write(data.join("pg_hba.conf"), hba)?;
        }
        for (name, contents, mode) in &opts.data_files {
            use std::os::unix::fs::PermissionsExt;
            let path = data.join(name);
            std::fs::write(&path, contents)?;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(*mode))?;
        }
        self.chown(root)?;
        Ok(())
    }

    fn write_port(&self) -> anyhow::Result<()> {
        let path = self.data_dir().join("postgresql.auto.conf");
        std::fs::write(&path, format!("port = {}\n", self.port))?;
        self.chown(&path)
    }

    fn pg_ctl_start(&self) -> anyhow::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "30", "start"]);
        self.run(cmd, "pg_ctl start").map_err(|e| {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            e.context(format!("server log:\n{log}"))
        })
    }

    /// Makes a physical standby of `primary` streaming from it over TCP through a physical slot
    /// of its own, with `extra_conf` appended (e.g. `sync_replication_slots = on`). The base is a
    /// copy of the primary's data directory taken while it is stopped (the system's
    /// pg_basebackup may be older than the server); the primary's replication slots are left
    /// out of the copy. The primary is stopped and started again.
    pub fn standby_of(primary: &PgCluster, extra_conf: &[&str]) -> anyhow::Result<Self> {
        let physical = crate::unique_name("standby_");
        let out = Command::new("psql")
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d"])
            .arg(primary.conn_str("postgres"))
            .arg("-c")
            .arg(format!(
                "SELECT pg_create_physical_replication_slot('{physical}', true)"
            ))
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!(
                "creating the standby's slot: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let mut standby = Self::copy_stopped(primary)?;
        let data = standby.data_dir();
        for slot in std::fs::read_dir(data.join("pg_replslot"))? {
            std::fs::remove_dir_all(slot?.path())?;
        }
        let mut conf = format!(
            "hot_standby = on\nhot_standby_feedback = on\n\
             primary_conninfo = 'host=127.0.0.1 port={} user=postgres password={} dbname=postgres'\n\
             primary_slot_name = '{physical}'\n",
            primary.port, SUPERUSER_PASSWORD
        );
        for line in extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        standby.append_conf(&conf)?;
        std::fs::write(data.join("standby.signal"), "")?;
        standby.start_copy()?;
        Ok(standby)
    }

    /// A copy of `primary` as it is now, started as a server of its own, replication slots
    /// included: what restoring a backup (or a snapshot of the volume) taken now gives. The
    /// primary is stopped for the copy and started again.
    pub fn copy_of(primary: &PgCluster) -> anyhow::Result<Self> {
        let mut copy = Self::copy_stopped(primary)?;
        copy.start_copy()?;
        Ok(copy)
    }

    /// A copy of `primary`'s data directory, taken while it is stopped (it is started again),
    /// with a socket directory of its own and no port yet.
    fn copy_stopped(primary: &PgCluster) -> anyhow::Result<Self> {
        primary.stop("fast")?;
        let dir = tempfile::Builder::new().prefix("pgcdc-test-").tempdir()?;
        let copy = PgCluster {
            bindir: primary.bindir.clone(),
            dir,
            os_user: primary.os_user.clone(),
            port: 0,
        };
        let copied = Command::new("cp")
            .arg("-a")
            .arg(primary.data_dir())
            .arg(copy.data_dir())
            .status()?;
        primary.restart_stopped()?;
        anyhow::ensure!(
            copied.success(),
            "copying the primary's data directory failed"
        );
        std::fs::create_dir_all(copy.socket_dir())?;
        let _ = std::fs::remove_file(copy.data_dir().join("postmaster.pid"));
        copy.append_conf(&format!(
            "\nunix_socket_directories = '{}'\n",
            copy.socket_dir().display()
        ))?;
        Ok(copy)
    }

    fn append_conf(&self, lines: &str) -> anyhow::Result<()> {
        let path = self.data_dir().join("postgresql.conf");
        let mut conf = std::fs::read_to_string(&path)?;
        conf.push_str(lines);
        std::fs::write(&path, conf)?;
        Ok(())
    }

    /// Starts a copy made by [`PgCluster::copy_stopped`] on a free port.
    fn start_copy(&mut self) -> anyhow::Result<()> {
        if self.os_user.is_some() {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(self.dir.path(), std::fs::Permissions::from_mode(0o755))?;
        }
        self.chown(self.dir.path())?;
        self.start_on_free_port()
    }

    /// Starts the server on a free port (another process may take a port between the choice
    /// and the start: three tries).
    fn start_on_free_port(&mut self) -> anyhow::Result<()> {
        let mut last_err = None;
        for _ in 0..3 {
            self.port = free_port()?;
            self.write_port()?;
            match self.pg_ctl_start() {
                Ok(()) => return Ok(()),
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("postgres did not start")))
    }

    /// Promotes a standby to primary and waits until it is.
    pub fn promote(&self) -> anyhow::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-w", "-t", "60", "promote"]);
        self.run(cmd, "pg_ctl promote")
    }

    /// The server's `server_version_num` (e.g. 170010).
    pub async fn version_num(&self) -> anyhow::Result<i32> {
        let client = self.connect("postgres").await?;
        Ok(client
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await?
            .get(0))
    }

    /// Starts the cluster again after [`PgCluster::stop`].
    pub fn restart_stopped(&self) -> anyhow::Result<()> {
        self.pg_ctl_start()
    }

    /// Stops the server with the given mode (`fast`, `immediate`, `smart`).
    pub fn stop(&self, mode: &str) -> anyhow::Result<()> {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", mode, "-w", "stop"]);
        self.run(cmd, "pg_ctl stop")
    }

    /// The path of a server binary (`pg_recvlogical`, `psql`, ...).
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }

    /// A libpq-style connection string for `database` as the superuser over TCP.
    pub fn conn_str(&self, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres password={} dbname={database}",
            self.port, SUPERUSER_PASSWORD
        )
    }

    /// Connects to `database` as the superuser; the connection runs on a spawned task.
    pub async fn connect(&self, database: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, conn) =
            tokio_postgres::connect(&self.conn_str(database), tokio_postgres::NoTls)
                .await
                .with_context(|| {
                    format!("connecting to throwaway cluster on port {}", self.port)
                })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Creates a database with a unique name and returns the name.
    pub async fn create_database(&self, prefix: &str) -> anyhow::Result<String> {
        let name = crate::unique_name(prefix);
        let admin = self.connect("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(name)
    }

    /// Runs SQL (several statements allowed) in `database`.
    pub async fn execute(&self, database: &str, sql: &str) -> anyhow::Result<()> {
        let client = self.connect(database).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("running SQL: {sql}"))
    }

    /// Connects to `database` over the unix socket (trust), for set-up on clusters whose TCP
    /// rules a test restricts.
    pub async fn connect_over_socket(
        &self,
        database: &str,
    ) -> anyhow::Result<tokio_postgres::Client> {
        let mut cfg = tokio_postgres::Config::new();
        cfg.host_path(self.socket_dir())
            .port(self.port)
            .user("postgres")
            .dbname(database);
        let (client, conn) = cfg.connect(tokio_postgres::NoTls).await.with_context(|| {
            format!(
                "connecting over the socket in {}",
                self.socket_dir().display()
            )
        })?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// [`PgCluster::create_database`] over the unix socket.
    pub async fn create_database_over_socket(&self, prefix: &str) -> anyhow::Result<String> {
        let name = crate::unique_name(prefix);
        let admin = self.connect_over_socket("postgres").await?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await?;
        Ok(name)
    }

    /// [`PgCluster::execute`] over the unix socket.
    pub async fn execute_over_socket(&self, database: &str, sql: &str) -> anyhow::Result<()> {
        let client = self.connect_over_socket(database).await?;
        client
            .batch_execute(sql)
            .await
            .with_context(|| format!("running SQL: {sql}"))
    }

    /// The server's log so far (for failure messages).
    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        let mut cmd = self.command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = cmd.status();
    }
}
