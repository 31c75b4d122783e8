//! Where the load goes: an Orchard router over gRPC or an OpenAI-compatible HTTP server.

use crate::error::BenchError;

/// A parsed `--target`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `grpc://HOST:PORT`: Orchard's public `Orchard.Generate` stream.
    Grpc {
        /// The `http://HOST:PORT` endpoint tonic connects to.
        endpoint: String,
    },
    /// `http://HOST:PORT[/prefix]`: an OpenAI-compatible server (`/v1/completions`).
    OpenAi {
        /// Base URL without a trailing slash; `/v1/...` is appended.
        base_url: String,
    },
}

impl Target {
    /// Parses `grpc://HOST:PORT` or `http://HOST:PORT`; anything else is a clear error (TLS is
    /// not built in, so `https://` is refused rather than failing later).
    pub fn parse(raw: &str) -> Result<Self, BenchError> {
        let bad = |reason: &str| BenchError::BadTarget {
            target: raw.to_owned(),
            reason: reason.to_owned(),
        };
        let trimmed = raw.trim().trim_end_matches('/');
        if let Some(rest) = trimmed.strip_prefix("grpc://") {
            check_authority(rest).map_err(bad)?;
            return Ok(Self::Grpc {
                endpoint: format!("http://{rest}"),
            });
        }
        if let Some(rest) = trimmed.strip_prefix("http://") {
            let authority = rest.split('/').next().unwrap_or_default();
            check_authority(authority).map_err(bad)?;
            return Ok(Self::OpenAi {
                base_url: trimmed.to_owned(),
            });
        }
        if trimmed.starts_with("https://") {
            return Err(bad("https is not supported; use http:// or grpc://"));
        }
        Err(bad("expected grpc://HOST:PORT or http://HOST:PORT"))
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Grpc { endpoint } => {
                let authority = endpoint.trim_start_matches("http://");
                write!(f, "grpc://{authority}")
            }
            Self::OpenAi { base_url } => f.write_str(base_url),
        }
    }
}

/// `HOST:PORT` with a non-empty host and a numeric port.
fn check_authority(authority: &str) -> Result<(), &'static str> {
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err("missing :PORT");
    };
    if host.is_empty() || host.contains('/') {
        return Err("missing host");
    }
    port.parse::<u16>()
        .map(|_| ())
        .map_err(|_| "port is not a number 0-65535")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_schemes_and_rejects_others() {
        assert_eq!(
            Target::parse("grpc://127.0.0.1:50051").ok(),
            Some(Target::Grpc {
                endpoint: "http://127.0.0.1:50051".into()
            })
        );
        assert_eq!(
            Target::parse("http://localhost:8000/").ok(),
            Some(Target::OpenAi {
                base_url: "http://localhost:8000".into()
            })
        );
        assert!(Target::parse("localhost:8000").is_err());
        assert!(Target::parse("grpc://host").is_err());
        assert!(Target::parse("grpc://host:notaport").is_err());
        assert!(Target::parse("https://host:443").is_err());
    }
}
