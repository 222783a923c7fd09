//! Certificates for a loopback TLS upstream: a certificate authority made for the test,
//! and a server certificate it signed for `localhost` and `127.0.0.1`.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A test CA and a server configuration whose certificate it signed.
pub struct TestCa {
    /// The CA's certificate, PEM: what a client must trust.
    pub ca_pem: String,
    /// For [`Upstream::start_tls`](crate::Upstream::start_tls): offers HTTP/2 and
    /// HTTP/1.1 by ALPN.
    pub server: Arc<rustls::ServerConfig>,
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    pub fn new() -> Self {
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("a CA key");
        let ca_cert = ca.self_signed(&ca_key).expect("the CA certificate");
        let issuer = Issuer::new(ca, ca_key);

        let names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        let mut leaf = CertificateParams::new(names).expect("server parameters");
        leaf.distinguished_name
            .push(DnType::CommonName, "localhost");
        let leaf_key = KeyPair::generate().expect("a server key");
        let leaf_cert = leaf
            .signed_by(&leaf_key, &issuer)
            .expect("the server certificate");

        let chain: Vec<CertificateDer<'static>> = vec![leaf_cert.der().clone()];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("a server configuration");
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            ca_pem: ca_cert.pem(),
            server: Arc::new(server),
        }
    }
}
