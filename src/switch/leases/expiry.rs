//! Expiring leases: an unused lease past its TTL is held, its account checked for processes,
//! then quarantined and freed; an account in use keeps its lease. Part of [`Gridmapdir`]; it
//! must not hand accounts out (that is `acquire.rs`).

use super::*;

impl Gridmapdir {
    pub(super) fn reclaim_expired(
        &self,
        prefix: &str,
        in_use: &dyn Fn(&str) -> bool,
        quarantine: &dyn Quarantine,
    ) -> Result<(), LeaseError> {
        let now = SystemTime::now();
        let leases = self.leases()?;
        let mut expired = Vec::new();
        for (account, ino, nlink) in self.accounts(prefix)? {
            let lease = leases.get(&ino);
            if self.meta_dir.join(format!("{account}.quarantine")).exists() {
                // An earlier quarantine did not finish: its lease is already held.
                self.retire(&account, lease.map(|(name, _)| name.as_str()), quarantine)?;
                continue;
            }
            if let Some((name, mtime)) = lease {
                if nlink >= 2
                    && now.duration_since(*mtime).unwrap_or_default() > self.ttl
                    && !in_use(&account)
                {
                    expired.push((account, name.clone()));
                }
            }
        }
        self.expire(prefix, expired, true, quarantine)?;
        Ok(())
    }

    /// Expires the given (account, lease name) pairs unless the account turns out to be in use:
    /// each lease is first held under [`hold_name`] (from then on no mapper can reuse it or take
    /// the account), then `/proc` is read once; an account with a live process, or whose lease
    /// LCMAPS touched just before it was held (it mapped the owner, a job may be starting;
    /// checked when `recent_use_counts`), gets its lease back, touched (checked again a TTL
    /// later); the others are retired. Returns the accounts kept.
    pub(super) fn expire(
        &self,
        prefix: &str,
        expired: Vec<(String, String)>,
        recent_use_counts: bool,
        quarantine: &dyn Quarantine,
    ) -> Result<Vec<String>, LeaseError> {
        if expired.is_empty() {
            return Ok(Vec::new());
        }
        for (account, name) in &expired {
            self.hold(account, name)?;
        }
        let accounts: Vec<String> = expired.iter().map(|(a, _)| a.clone()).collect();
        let busy = match self.busy(prefix, &accounts) {
            Ok(busy) => busy,
            Err(e) => {
                for (account, name) in &expired {
                    self.unhold(account, name)?;
                }
                return Err(e);
            }
        };
        let now = SystemTime::now();
        let mut kept = Vec::new();
        for (account, name) in expired {
            let held = self.dir.join(hold_name(&account));
            let touched = recent_use_counts
                && held
                    .symlink_metadata()
                    .and_then(|m| m.modified())
                    .map(|t| now.duration_since(t).unwrap_or_default() <= self.ttl)
                    .map_err(io_err(&held))?;
            if busy.contains(&account) || touched {
                self.unhold(&account, &name)?;
                kept.push(account);
            } else {
                self.retire(&account, Some(&hold_name(&account)), quarantine)?;
            }
        }
        Ok(kept)
    }

    /// Renames the lease `name` of `account` to its hold name (one rename: the account file
    /// keeps its two links throughout).
    pub(super) fn hold(&self, account: &str, name: &str) -> Result<(), LeaseError> {
        let held = self.dir.join(hold_name(account));
        if name != hold_name(account) {
            fs::rename(self.dir.join(name), &held).map_err(io_err(&held))?;
        }
        Ok(())
    }

    /// Gives a held lease its name back, touched. When the name was taken meanwhile (LCMAPS
    /// leased the owner another account), or is unknown (an earlier hold), the account stays
    /// held: still leased to nobody new, and checked again a TTL later.
    pub(super) fn unhold(&self, account: &str, name: &str) -> Result<(), LeaseError> {
        let held = self.dir.join(hold_name(account));
        let link = self.dir.join(name);
        if name != hold_name(account) {
            match fs::hard_link(&held, &link) {
                Ok(()) => {
                    fs::remove_file(&held).map_err(io_err(&held))?;
                    return touch(&link);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(&link)(e)),
            }
        }
        touch(&held)
    }

    /// Takes an account out of circulation and back: quarantine marker, lease held (so LCMAPS
    /// sees the account leased while it is cleaned), processes killed and files removed, hold
    /// link and marker removed. A failed cleanup leaves the marker and the hold, so the account
    /// is handed out by neither mapper and the next acquire retries.
    pub(super) fn retire(
        &self,
        account: &str,
        lease: Option<&str>,
        quarantine: &dyn Quarantine,
    ) -> Result<(), LeaseError> {
        let marker = self.meta_dir.join(format!("{account}.quarantine"));
        fs::write(&marker, b"").map_err(io_err(&marker))?;
        if let Some(name) = lease {
            self.hold(account, name)?;
        }
        quarantine
            .clean(account)
            .map_err(|why| LeaseError::Cleanup {
                account: account.to_string(),
                why,
            })?;
        let held = self.dir.join(hold_name(account));
        match fs::remove_file(&held) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&held)(e)),
        }
        let _ = fs::remove_file(self.meta_dir.join(account));
        fs::remove_file(&marker).map_err(io_err(&marker))?;
        Ok(())
    }
}
