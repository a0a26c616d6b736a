//! The console's certificate: the configured PEM files, or a self-signed
//! certificate generated once (rcgen) and kept in `STATE_DIR/web/` (the key
//! 0600 in a 0700 directory), so browsers see the same certificate across
//! restarts and an operator can pin it. rustls with the ring provider: no
//! OpenSSL.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Errors loading or creating the certificate.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no certificate in the file")]
    NoCert(PathBuf),
    #[error("{0}: no private key in the file")]
    NoKey(PathBuf),
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
    #[error("the certificate and key are not usable: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Where the self-signed certificate and its key are kept.
pub fn self_signed_paths(state_dir: &Path) -> (PathBuf, PathBuf) {
    let dir = state_dir.join("web");
    (dir.join("cert.pem"), dir.join("key.pem"))
}

/// Creates the self-signed certificate unless it exists; returns its paths.
pub fn ensure_self_signed(
    state_dir: &Path,
    names: Vec<String>,
) -> Result<(PathBuf, PathBuf), TlsError> {
    let (cert, key) = self_signed_paths(state_dir);
    if cert.exists() && key.exists() {
        return Ok((cert, key));
    }
    let generated =
        rcgen::generate_simple_self_signed(names).map_err(|e| TlsError::Generate(e.to_string()))?;
    if let Some(dir) = cert.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| TlsError::Write {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    // The key first: a certificate without its key is regenerated next time.
    vmha_fs::atomic::write(&key, generated.key_pair.serialize_pem().as_bytes()).map_err(
        |source| TlsError::Write {
            path: key.clone(),
            source,
        },
    )?;
    vmha_fs::atomic::write(&cert, generated.cert.pem().as_bytes()).map_err(|source| {
        TlsError::Write {
            path: cert.clone(),
            source,
        }
    })?;
    tracing::info!(
        "generated a self-signed console certificate in {}",
        cert.display()
    );
    Ok((cert, key))
}

/// The rustls server configuration from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TlsError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|source| TlsError::Read {
            path: cert.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCert(cert.to_path_buf()));
    }
    let key_pem = read(key)?;
    let key_der: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|source| TlsError::Read {
            path: key.to_path_buf(),
            source,
        })?
        .ok_or_else(|| TlsError::NoKey(key.to_path_buf()))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
