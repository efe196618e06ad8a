//! What apps call out to in the outbound tests: a small HTTP/1.1 server on loopback, plain or
//! TLS (with certificates from `tls_files`), each connection in a thread of its own. It counts
//! the requests it received, so a test can tell a refused call never left the device.
//!
//! Routes: `/hello` (200, `hello from upstream`), `/redirect?URL` (302 to URL), `/big?N` (200,
//! N bytes), `/stall` (the head and 10 of 100 bytes, then nothing for 30 s), `/silent`
//! (nothing at all for 30 s).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Upstream {
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
}

impl Upstream {
    /// Starts a plain HTTP server on 127.0.0.1.
    pub fn plain() -> Upstream {
        Upstream::start(None)
    }

    /// Starts an HTTPS server on 127.0.0.1 with the certificate and key (PEM files) given.
    pub fn tls(cert: &Path, key: &Path) -> Upstream {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let certs = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        Upstream::start(Some(Arc::new(config)))
    }

    fn start(tls: Option<Arc<rustls::ServerConfig>>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&requests);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (tls, counted) = (tls.clone(), Arc::clone(&counted));
                std::thread::spawn(move || {
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                    match tls {
                        None => serve(stream, &counted),
                        Some(config) => {
                            let Ok(connection) = rustls::ServerConnection::new(config) else {
                                return;
                            };
                            serve(rustls::StreamOwned::new(connection, stream), &counted)
                        }
                    }
                });
            }
        });
        Upstream { addr, requests }
    }

    /// Requests received so far (a TLS handshake that failed is none).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
}

/// Answers one request per connection.
fn serve<S: Read + Write>(mut stream: S, requests: &AtomicUsize) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) if head.len() < 16 << 10 => head.push(byte[0]),
            _ => return,
        }
    }
    requests.fetch_add(1, Ordering::SeqCst);
    let head = String::from_utf8_lossy(&head);
    let target = head.split(' ').nth(1).unwrap_or("/").to_string();
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let respond = |stream: &mut S, status: &str, headers: &str, body: &[u8]| {
        let _ = write!(
            stream,
            "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n",
            body.len()
        );
        let _ = stream.write_all(body);
        let _ = stream.flush();
    };
    match path {
        "/hello" => respond(&mut stream, "200 OK", "", b"hello from upstream"),
        "/redirect" => respond(
            &mut stream,
            "302 Found",
            &format!("location: {query}\r\n"),
            b"",
        ),
        "/big" => {
            let size: usize = query.parse().unwrap_or(0);
            respond(&mut stream, "200 OK", "", &vec![b'x'; size]);
        }
        "/stall" => {
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789");
            let _ = stream.flush();
            std::thread::sleep(Duration::from_secs(30));
        }
        "/silent" => std::thread::sleep(Duration::from_secs(30)),
        _ => respond(&mut stream, "404 Not Found", "", b"no such route"),
    }
}

/// A CA and a server certificate for `host` signed by it, as PEM files in `dir`: (CA
/// certificate, server certificate, server key).
pub fn tls_files(dir: &Path, host: &str) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cairn test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let server_key = KeyPair::generate().unwrap();
    let mut server_params = CertificateParams::new(vec![host.to_string()]).unwrap();
    server_params
        .distinguished_name
        .push(DnType::CommonName, "cairn test server");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = server_params.signed_by(&server_key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, server.pem()).unwrap();
    std::fs::write(&paths.2, server_key.serialize_pem()).unwrap();
    paths
}
