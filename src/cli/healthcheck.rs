//! A minimal HTTP/1.1 GET for container health checks (`lagprobe healthcheck`), so images
//! need no curl: plain `http://` only, one request, status line checked.

use std::time::Duration;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use lagprobe::{Error, Result};

/// GETs `url` and returns the HTTP status code.
pub async fn http_get_status(url: &str, timeout: Duration) -> Result<u16> {
    let parsed = url::Url::parse(url).map_err(|error| Error::invalid("url", error.to_string()))?;
    if parsed.scheme() != "http" {
        return Err(Error::invalid("url", "only http:// URLs are supported"));
    }
    let host = parsed
        .host_str()
        .ok_or_else(|| Error::invalid("url", "the URL has no host"))?;
    let port = parsed.port_or_known_default().unwrap_or(80);
    let path = match parsed.query() {
        Some(query) => format!("{}?{query}", parsed.path()),
        None => parsed.path().to_owned(),
    };
    let exchange = async {
        let mut stream = TcpStream::connect((host, port)).await?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await?;
        let mut head = Vec::new();
        let mut buffer = [0u8; 1024];
        while !head.windows(2).any(|pair| pair == b"\r\n") {
            let read = stream.read(&mut buffer).await?;
            if read == 0 {
                break;
            }
            head.extend_from_slice(&buffer[..read]);
        }
        Ok::<_, std::io::Error>(head)
    };
    let head = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| Error::io(format!("GET {url}"))(std::io::ErrorKind::TimedOut.into()))?
        .map_err(Error::io(format!("GET {url}")))?;
    // "HTTP/1.1 200 OK"
    String::from_utf8_lossy(&head)
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| Error::io(format!("GET {url}"))(std::io::ErrorKind::InvalidData.into()))
}
