//! Giving an owner a pool account: its own lease again, a lease of the former naming renamed,
//! a lease in another pool released, or a free account linked and checked as LCMAPS checks.
//! Part of [`Gridmapdir`]; it must not expire leases (that is `expiry.rs`).

use super::*;

impl Gridmapdir {
    /// [`Gridmapdir::acquire`] for an owner whose FQANs (all of them, most significant first)
    /// are `owner_fqans`, of which `fqans` chose the pool: with a groupmapfile, LCMAPS names the
    /// lease by the groups of all the owner's FQANs.
    pub fn acquire_for(
        &self,
        dn: &str,
        fqans: &[String],
        owner_fqans: &[String],
        prefix: &str,
        in_use: &dyn Fn(&str) -> bool,
        quarantine: &dyn Quarantine,
    ) -> Result<String, LeaseError> {
        let groups = if fqans.is_empty() {
            Vec::new()
        } else {
            self.lease_groups(prefix, owner_fqans)?
        };
        let name = lease_name(dn, &groups);
        let former = former_lease_name(dn, fqans);
        let _lock = self.lock()?;
        let link = self.dir.join(&name);
        let accounts = self.accounts(prefix)?;
        if accounts.is_empty() {
            return Err(LeaseError::EmptyPool {
                prefix: prefix.to_string(),
                dir: self.dir.clone(),
            });
        }
        match self.existing(&link, &accounts)? {
            Existing::Ours(account) => {
                touch(&link)?;
                return Ok(account);
            }
            Existing::Solitary => fs::remove_file(&link).map_err(io_err(&link))?,
            Existing::Elsewhere(ino) => {
                self.release_elsewhere(&name, ino, prefix, in_use, quarantine)?
            }
            Existing::None => {}
        }
        if former != name {
            let old = self.dir.join(&former);
            if let Existing::Ours(account) = self.existing(&old, &accounts)? {
                return self.migrate(&old, &link, account, &accounts);
            }
        }
        self.reclaim_expired(prefix, in_use, quarantine)?;
        let accounts = self.accounts(prefix)?;
        let free: Vec<String> = accounts
            .iter()
            .filter(|(account, _, nlink)| {
                *nlink == 1 && !self.meta_dir.join(format!("{account}.quarantine")).exists()
            })
            .map(|(account, _, _)| account.clone())
            .collect();
        // A free account whose processes run (a lease removed by hand or by a cleanup script
        // while its job runs) is nobody's to take: its processes are another owner's.
        let busy = self.busy(prefix, &free)?;
        for (account, ino, _) in &accounts {
            if !free.contains(account) || busy.contains(account) {
                continue;
            }
            match self.link_checked(account, *ino, &link)? {
                Linked::Done => {}
                Linked::Raced => continue,
                Linked::NameTaken => return self.taken_meanwhile(&link, &accounts),
            }
            touch(&link)?;
            let meta = self.meta_dir.join(account);
            let record = serde_json::json!({"owner": name, "since": unix_secs(SystemTime::now())});
            fs::write(&meta, record.to_string()).map_err(io_err(&meta))?;
            return Ok(account.clone());
        }
        Err(LeaseError::Exhausted {
            prefix: prefix.to_string(),
            size: accounts.len(),
            busy: busy.len(),
            dir: self.dir.clone(),
        })
    }

    /// The owner's lease name appeared while we linked: LCMAPS mapped the same owner in the same
    /// instant. Its account is the owner's, if it is one of this pool.
    pub(super) fn taken_meanwhile(
        &self,
        link: &Path,
        accounts: &[(String, u64, u64)],
    ) -> Result<String, LeaseError> {
        match self.existing(link, accounts)? {
            Existing::Ours(account) => {
                touch(link)?;
                Ok(account)
            }
            _ => Err(LeaseError::Inconsistent {
                path: link.to_path_buf(),
                why: "was created by another mapper while this one leased an account; retry the launch".into(),
            }),
        }
    }

    /// An owner's lease of the helper's former naming keeps its account: the account file gets
    /// the LCMAPS name as its lease and loses the former one (briefly three links, never fewer
    /// than two, so no mapper sees the account free). The lease's time of last use is kept.
    pub(super) fn migrate(
        &self,
        old: &Path,
        link: &Path,
        account: String,
        accounts: &[(String, u64, u64)],
    ) -> Result<String, LeaseError> {
        match fs::hard_link(old, link) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                // LCMAPS leased the owner an account meanwhile; the former lease expires.
                return self.taken_meanwhile(link, accounts);
            }
            Err(e) => return Err(io_err(link)(e)),
        }
        fs::remove_file(old).map_err(io_err(old))?;
        touch(link)?;
        let meta = self.meta_dir.join(&account);
        if let Some(mut record) = fs::read(&meta)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            record["owner"] =
                serde_json::Value::from(link.file_name().map(|n| n.to_string_lossy().into_owned()));
            fs::write(&meta, record.to_string()).map_err(io_err(&meta))?;
        }
        Ok(account)
    }

    /// The owner's lease holds an account outside pool `prefix` (the site moved the owner to
    /// another pool). LCMAPS refuses such a lease unless told to override it, and then drops it
    /// without cleanup; the helper drops it after quarantining that account, as an expired
    /// lease, unless payloads of the account run now.
    pub(super) fn release_elsewhere(
        &self,
        name: &str,
        ino: u64,
        prefix: &str,
        in_use: &dyn Fn(&str) -> bool,
        quarantine: &dyn Quarantine,
    ) -> Result<(), LeaseError> {
        let link = self.dir.join(name);
        let held = self
            .accounts("")?
            .into_iter()
            .find(|(_, i, _)| *i == ino)
            .map(|(account, _, _)| account);
        let Some(account) = held else {
            // Linked to no account file of the directory: it holds nothing.
            return fs::remove_file(&link).map_err(io_err(&link));
        };
        let moving = || LeaseError::Moving {
            lease: name.to_string(),
            account: account.clone(),
            prefix: prefix.to_string(),
        };
        if in_use(&account) {
            return Err(moving());
        }
        let lease = vec![(account.clone(), name.to_string())];
        let kept = self.expire(prefix, lease, false, quarantine)?;
        if kept.is_empty() {
            Ok(())
        } else {
            Err(moving())
        }
    }
}
