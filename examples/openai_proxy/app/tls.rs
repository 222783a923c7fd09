//! The upstream client's connector: plain TCP for `http://`, rustls for `https://`
//! (through hyper-rustls, with the `ring` provider), HTTP/2 or HTTP/1.1 as the server
//! picks by ALPN.

use std::path::Path;
use std::sync::Arc;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// Which certificate authorities a `https://` upstream's certificate may chain to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// Mozilla's, compiled in (webpki-roots): the same on every machine.
    Webpki,
    /// The operating system's store (rustls-native-certs), where a company adds its own.
    Platform,
}

impl std::str::FromStr for Roots {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "webpki" => Ok(Roots::Webpki),
            "platform" => Ok(Roots::Platform),
            _ => Err(format!("{text:?} is not webpki or platform")),
        }
    }
}

/// The connector, trusting `roots` and the certificates of `ca_file` if given.
pub fn connector(
    roots: Roots,
    ca_file: Option<&Path>,
) -> Result<HttpsConnector<HttpConnector>, String> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::Webpki => store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        Roots::Platform => {
            // Unreadable files are skipped: a store is usable if it has any root.
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = store.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(format!(
                    "--roots platform: no certificate found in the system's store ({:?})",
                    found.errors
                ));
            }
        }
    }
    if let Some(path) = ca_file {
        let read = |e: &dyn std::fmt::Display| format!("--ca-file {}: {e}", path.display());
        let certs = CertificateDer::pem_file_iter(path).map_err(|e| read(&e))?;
        let mut count = 0;
        for cert in certs {
            store
                .add(cert.map_err(|e| read(&e))?)
                .map_err(|e| read(&e))?;
            count += 1;
        }
        if count == 0 {
            return Err(read(&"no CERTIFICATE in the file"));
        }
    }

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(store)
        .with_no_client_auth();
    // TCP_NODELAY, as for any streaming client: each small event goes out at once.
    let mut tcp = HttpConnector::new();
    tcp.set_nodelay(true);
    tcp.enforce_http(false);
    Ok(HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(tcp))
}
