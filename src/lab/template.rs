//! The cluster template: an initialised, cleanly stopped cluster with the lab's database
//! already created, kept in the user's cache folder, one per PostgreSQL binary set. A lab
//! copies it for its primary and for each replica (plus `standby.signal`) instead of running
//! initdb and pg_basebackup: copies of one never-diverged cluster share its system
//! identifier, so the replicas stream from the primary's first WAL on.
//!
//! initdb is most of a cold lab start (0.5 to 1 s); a copy on tmpfs takes tens of ms.
//! Templates are built in a scratch folder and renamed into place, so labs starting in
//! parallel never see half of one (the loser of a race throws its copy away).

use std::{
    hash::{Hash, Hasher},
    path::{Path, PathBuf},
};

use super::{LAB_DATABASE, LAB_USER, LabError, Programs, has_cluster, sql};

/// Bumped when what a template holds changes, so old ones are not reused.
const TEMPLATE_FORMAT: u32 = 1;

impl Programs<'_> {
    /// The template for these binaries in `cache_dir`, built first if there is none.
    pub(super) async fn template(&self, cache_dir: &Path) -> Result<PathBuf, LabError> {
        let templates = cache_dir.join("templates");
        let template = templates.join(self.template_key());
        if has_cluster(&template).await {
            return Ok(template);
        }
        self.make_owned_dir(&templates).await?;
        let scratch = tempfile::Builder::new()
            .prefix(".building-")
            .tempdir_in(&templates)
            .map_err(LabError::io(format!(
                "creating a folder in {}",
                templates.display()
            )))?;
        if let Some(user) = self.run_as {
            user.chown(scratch.path())?;
        }
        let cluster = scratch.path().join("cluster");
        self.initdb(&cluster).await?;
        self.create_lab_database_single_user(&cluster).await?;
        match tokio::fs::rename(&cluster, &template).await {
            Ok(()) => tracing::info!(template = %template.display(), "cached a cluster template"),
            // Another lab finished one first: use that.
            Err(_) if has_cluster(&template).await => {}
            Err(error) => {
                return Err(LabError::io(format!("storing {}", template.display()))(
                    error,
                ));
            }
        }
        Ok(template)
    }

    /// The PostgreSQL version and where its binaries are, and how the cluster is made.
    fn template_key(&self) -> String {
        let mut hasher = std::hash::DefaultHasher::new();
        (
            TEMPLATE_FORMAT,
            &self.binaries.bindir,
            LAB_USER,
            LAB_DATABASE,
        )
            .hash(&mut hasher);
        format!("{}-{:016x}", self.binaries.version, hasher.finish())
    }

    /// Creates `dir` (and its parents), owned by the lab's user, who builds templates in it.
    async fn make_owned_dir(&self, dir: &Path) -> Result<(), LabError> {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(LabError::io(format!("creating {}", dir.display())))?;
        if let Some(user) = self.run_as {
            user.chown(dir)?;
        }
        Ok(())
    }

    /// `CREATE DATABASE` in single-user mode: no server, no port, and a clean shutdown.
    async fn create_lab_database_single_user(&self, cluster: &Path) -> Result<(), LabError> {
        let statement = format!("{};\n", sql::CREATE_LAB_DATABASE);
        let mut postgres = self.command("postgres");
        postgres
            .arg("--single")
            .arg("-D")
            .arg(cluster)
            .args(["-c", "fsync=off", "postgres"])
            .stdin(std::process::Stdio::piped());
        let mut child = postgres
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(LabError::io("starting postgres --single"))?;
        if let Some(mut stdin) = child.stdin.take() {
            use tokio::io::AsyncWriteExt;
            stdin
                .write_all(statement.as_bytes())
                .await
                .map_err(LabError::io("writing to postgres --single"))?;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(LabError::io("running postgres --single"))?;
        let text = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() || text.contains("ERROR") {
            return Err(LabError::CommandFailed {
                what: "creating the lab database in postgres --single".into(),
                status: output.status.to_string(),
                output: text.into_owned(),
            });
        }
        Ok(())
    }

    /// Copies of `source` at each of `targets` that do not hold a cluster yet, all at
    /// once, by the lab's user (`cp -a` keeps the modes PostgreSQL insists on).
    pub(super) async fn copy_clusters(
        &self,
        source: &Path,
        targets: &[PathBuf],
    ) -> Result<(), LabError> {
        // Started first, waited for after: futures would run one by one.
        let mut copies = Vec::new();
        for target in targets {
            if has_cluster(target).await {
                continue;
            }
            let mut copy = super::lab_command(Path::new("cp"), self.run_as, self.root);
            copy.arg("-a")
                .arg(source)
                .arg(target)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped());
            copies.push(copy.spawn().map_err(LabError::io("starting cp"))?);
        }
        for copy in copies {
            let output = copy
                .wait_with_output()
                .await
                .map_err(LabError::io("copying a cluster"))?;
            if !output.status.success() {
                return Err(LabError::CommandFailed {
                    what: format!("cp -a {}", source.display()),
                    status: output.status.to_string(),
                    output: String::from_utf8_lossy(&output.stderr).into_owned(),
                });
            }
        }
        Ok(())
    }
}
