//! The client side of the VO server API used by `mupilot-server submit|status|output|cancel|info`:
//! an mTLS HTTPS client, input bundle packing and output unpacking. No server state here.

use std::path::Path;

use crate::protocol::api::{ApiError, InformationView, PayloadView, SubmitRequest, SubmitResponse};

use super::config::{ClientConfig, ConfigError};

/// Why a client command failed. [`ClientError::exit_code`] maps each to the documented code.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot reach the VO server at {url}: {source}; check --server and that mupilot-server is running")]
    Http { url: String, source: reqwest::Error },
    #[error("the server refused ({status}, {code}): {message}")]
    Server {
        status: u16,
        code: String,
        message: String,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Timeout(String),
    #[cfg_attr(not(feature = "grid"), allow(dead_code))]
    #[error("proxy {path}: {message}")]
    Proxy { path: String, message: String },
}

impl ClientError {
    /// 2 for usage and configuration errors, 1 for everything at run time.
    pub fn exit_code(&self) -> i32 {
        match self {
            Self::Usage(_) | Self::Config(_) | Self::Tls(_) | Self::Proxy { .. } => 2,
            _ => 1,
        }
    }
}

/// An authenticated connection to one VO server.
pub struct Client {
    http: reqwest::Client,
    base: String,
    /// The member a portal acts for (the `Mupilot-On-Behalf-Of` header of every request).
    on_behalf_of: Option<reqwest::header::HeaderValue>,
}

impl Client {
    /// Builds the mTLS client from a client config (certificate, key, CA).
    pub fn new(cfg: &ClientConfig) -> Result<Self, ClientError> {
        if !cfg.server_url.starts_with("https://") {
            return Err(ClientError::Usage(format!(
                "server URL {:?} must start with https://",
                cfg.server_url
            )));
        }
        let http = crate::tls::https_client(&cfg.cert, &cfg.key, &cfg.ca)?;
        Ok(Client {
            http,
            base: cfg.server_url.trim_end_matches('/').to_string(),
            on_behalf_of: None,
        })
    }

    /// Sends every request on behalf of the member `dn` (for a portal's certificate).
    pub fn on_behalf_of(mut self, dn: &str) -> Result<Self, ClientError> {
        if !dn.starts_with('/') {
            return Err(ClientError::Usage(format!(
                "--on-behalf-of {dn:?}: give the member's grid-style DN, e.g. \"/DC=org/DC=example/CN=alice\""
            )));
        }
        // From bytes: a DN may hold UTF-8 beyond ASCII.
        let v = reqwest::header::HeaderValue::from_bytes(dn.as_bytes()).map_err(|_| {
            ClientError::Usage(format!(
                "--on-behalf-of {dn:?}: a DN without control characters"
            ))
        })?;
        self.on_behalf_of = Some(v);
        Ok(self)
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<reqwest::Response, ClientError> {
        let req = match &self.on_behalf_of {
            Some(v) => req.header(crate::server::portal::identity::ON_BEHALF_OF, v.clone()),
            None => req,
        };
        let resp = req.send().await.map_err(|source| ClientError::Http {
            url: url.to_string(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let (code, message) = match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => (e.error, e.message),
            Err(_) => ("http".to_string(), text),
        };
        Err(ClientError::Server {
            status,
            code,
            message,
        })
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<T, ClientError> {
        self.send(req, url)
            .await?
            .json()
            .await
            .map_err(|source| ClientError::Http {
                url: url.to_string(),
                source,
            })
    }

    /// `GET` of a JSON resource under the server's base URL (the membership API).
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        self.json(self.http.get(&url), &url).await
    }

    /// `POST` of a JSON body under the server's base URL (the membership API).
    pub async fn post_json<B: serde::Serialize, T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let url = self.url(path);
        self.json(self.http.post(&url).json(body), &url).await
    }

    /// `POST /v1/payloads`.
    pub async fn submit(&self, req: &SubmitRequest) -> Result<SubmitResponse, ClientError> {
        let url = self.url("/v1/payloads");
        self.json(self.http.post(&url).json(req), &url).await
    }

    /// Delegates the proxy in `proxy_file` to the server without sending its key: the
    /// server makes a key and a request (`POST /v1/delegations`), a proxy valid `lifetime`
    /// (cut to the user's proxy) is signed for it here with the user's proxy, and the chain
    /// is uploaded (`PUT /v1/delegations/{id}`).
    #[cfg(feature = "grid")]
    pub async fn delegate(
        &self,
        proxy_file: &Path,
        lifetime: chrono::Duration,
        limited: bool,
    ) -> Result<crate::protocol::delegation::DelegationView, ClientError> {
        use crate::grid::delegation::{Credential, ProxyOrder};
        use crate::protocol::delegation::{DelegationCreated, DelegationUpload};
        let path = proxy_file.display().to_string();
        let pem = std::fs::read(proxy_file).map_err(|source| ClientError::Io {
            what: "cannot read proxy",
            path: path.clone(),
            source,
        })?;
        let bad = |e: &dyn std::fmt::Display| ClientError::Proxy {
            path: path.clone(),
            message: e.to_string(),
        };
        let user = Credential::from_proxy_pem(&pem).map_err(|e| bad(&e))?;
        let url = self.url("/v1/delegations");
        let created: DelegationCreated = self.json(self.http.post(&url), &url).await?;
        let order = ProxyOrder { lifetime, limited };
        let issued = user
            .sign_proxy(created.csr_pem.as_bytes(), &order, chrono::Utc::now())
            .map_err(|e| bad(&e))?;
        let url = self.url(&format!(
            "/v1/delegations/{}",
            checked(&created.delegation_id)?
        ));
        let up = DelegationUpload {
            chain_pem: issued.chain_pem,
        };
        self.json(self.http.put(&url).json(&up), &url).await
    }

    /// `GET /v1/payloads/{id}`.
    pub async fn view(&self, id: &str) -> Result<PayloadView, ClientError> {
        let url = self.url(&format!("/v1/payloads/{}", checked(id)?));
        self.json(self.http.get(&url), &url).await
    }

    /// `GET /v1/payloads/{id}/output`: the output archive (tar.gz).
    pub async fn output(&self, id: &str) -> Result<Vec<u8>, ClientError> {
        let url = self.url(&format!("/v1/payloads/{}/output", checked(id)?));
        let resp = self.send(self.http.get(&url), &url).await?;
        let bytes = resp.bytes().await.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        Ok(bytes.to_vec())
    }

    /// `POST /v1/payloads/{id}/signal`.
    pub async fn signal(&self, id: &str, signal: i32) -> Result<PayloadView, ClientError> {
        let url = self.url(&format!("/v1/payloads/{}/signal", checked(id)?));
        self.json(
            self.http
                .post(&url)
                .json(&serde_json::json!({ "signal": signal })),
            &url,
        )
        .await
    }

    /// `POST /v1/payloads/{id}/information`: a new request to the payload's site helper.
    pub async fn request_information(&self, id: &str) -> Result<InformationView, ClientError> {
        let url = self.url(&format!("/v1/payloads/{}/information", checked(id)?));
        self.json(self.http.post(&url), &url).await
    }

    /// `GET /v1/payloads/{id}/information/{request_id}`: the request and its answer so far.
    pub async fn information(
        &self,
        id: &str,
        request_id: &str,
    ) -> Result<InformationView, ClientError> {
        let url = self.url(&format!(
            "/v1/payloads/{}/information/{request_id}",
            checked(id)?
        ));
        self.json(self.http.get(&url), &url).await
    }

    /// `POST /v1/payloads/{id}/cancel`.
    pub async fn cancel(&self, id: &str) -> Result<PayloadView, ClientError> {
        let url = self.url(&format!("/v1/payloads/{}/cancel", checked(id)?));
        self.json(self.http.post(&url), &url).await
    }
}

fn checked(id: &str) -> Result<&str, ClientError> {
    if crate::util::is_safe_id(id) {
        Ok(id)
    } else {
        Err(ClientError::Usage(format!(
            "{id:?} is not a payload id (ids look like p-0123abcd...)"
        )))
    }
}

/// Packs a directory's contents as a tar.gz (paths relative to the directory).
pub fn pack_dir(dir: &Path) -> Result<Vec<u8>, ClientError> {
    let io = |source| ClientError::Io {
        what: "cannot pack bundle directory",
        path: dir.display().to_string(),
        source,
    };
    if !dir.is_dir() {
        return Err(ClientError::Usage(format!(
            "--bundle {}: not a directory",
            dir.display()
        )));
    }
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.follow_symlinks(false);
    tar.append_dir_all(".", dir).map_err(io)?;
    tar.into_inner().map_err(io)?.finish().map_err(io)
}

/// Unpacks a tar.gz into `to` (created if needed). Entries that would land outside `to`
/// are skipped by the tar crate.
pub fn unpack(data: &[u8], to: &Path) -> Result<(), ClientError> {
    let io = |source| ClientError::Io {
        what: "cannot unpack output into",
        path: to.display().to_string(),
        source,
    };
    std::fs::create_dir_all(to).map_err(io)?;
    let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(data));
    ar.set_preserve_permissions(false);
    ar.unpack(to).map_err(io)
}

/// Parses a memory size: bytes, or a number with K, M, G or T (powers of 1024), e.g. `512M`.
pub fn parse_memory(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                'B' => 1,
                _ => return Err(format!("{s:?}: unknown unit; use K, M, G or T, e.g. 512M")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size; write e.g. 512M, 2G or 1073741824"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory("512M").unwrap(), 512 << 20);
        assert_eq!(parse_memory("2g").unwrap(), 2 << 30);
        assert_eq!(parse_memory("1000").unwrap(), 1000);
        assert!(parse_memory("12Q").is_err());
        assert!(parse_memory("M").is_err());
    }

    #[test]
    fn pack_unpack_roundtrip() {
        let src = tempfile::tempdir().unwrap();
        std::fs::create_dir(src.path().join("sub")).unwrap();
        std::fs::write(src.path().join("sub/a.txt"), "hello").unwrap();
        let data = pack_dir(src.path()).unwrap();
        let dst = tempfile::tempdir().unwrap();
        unpack(&data, dst.path()).unwrap();
        assert_eq!(
            std::fs::read_to_string(dst.path().join("sub/a.txt")).unwrap(),
            "hello"
        );
    }
}
