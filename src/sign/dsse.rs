//! DSSE envelopes (the secure-systems-lab DSSE specification, `envelope.md` and `protocol.md`):
//! `{payload, payloadType, signatures: [{keyid, sig}]}`, payload and sig in
//! base64, each signature over the pre-authentication encoding [`pae`] of
//! the type and the payload, so a signature for one payload type can never
//! pass for another (the type confusion of CVE-2022-35929).

use serde::{Deserialize, Serialize};

use super::key::{PublicKey, SigningKey};
use super::{b64, unb64};

/// The payload type of an in-toto statement.
pub const IN_TOTO_PAYLOAD: &str = "application/vnd.in-toto+json";

/// `"DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`, lengths as
/// decimal byte counts.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload_type.len() + payload.len() + 32);
    for part in [
        b"DSSEv1".as_slice(),
        payload_type.len().to_string().as_bytes(),
        payload_type.as_bytes(),
        payload.len().to_string().as_bytes(),
    ] {
        out.extend_from_slice(part);
        out.push(b' ');
    }
    out.extend_from_slice(payload);
    out
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub payload: String,
    #[serde(rename = "payloadType")]
    pub payload_type: String,
    pub signatures: Vec<Signature>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signature {
    /// Who claims to have signed: a hint, not authenticated.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub keyid: String,
    pub sig: String,
}

impl Envelope {
    /// `payload` signed by `key`, its name as the keyid.
    pub fn sign(payload_type: &str, payload: &[u8], key: &SigningKey) -> Envelope {
        Envelope {
            payload: b64(payload),
            payload_type: payload_type.to_owned(),
            signatures: vec![Signature {
                keyid: key.name.clone(),
                sig: b64(&key.sign(&pae(payload_type, payload))),
            }],
        }
    }

    /// One line of JSON (the `.intoto.jsonl` convention), newline included.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("an envelope serialises");
        line.push('\n');
        line
    }

    pub fn parse(line: &str) -> Result<Envelope, String> {
        serde_json::from_str(line).map_err(|e| format!("not a DSSE envelope: {e}"))
    }

    pub fn payload(&self) -> Result<Vec<u8>, String> {
        unb64(&self.payload).ok_or_else(|| "its payload is not base64".to_owned())
    }

    /// The trusted keys with a good signature on this envelope. Every key
    /// is tried against every signature: the keyid only says who claims it.
    pub fn signed_by<'k>(&self, trusted: &'k [PublicKey]) -> Result<Vec<&'k PublicKey>, String> {
        let message = pae(&self.payload_type, &self.payload()?);
        let sigs: Vec<Vec<u8>> = self
            .signatures
            .iter()
            .filter_map(|s| unb64(&s.sig))
            .collect();
        Ok(trusted
            .iter()
            .filter(|k| sigs.iter().any(|s| k.verifies(&message, s)))
            .collect())
    }

    /// The keyids the envelope claims, for messages.
    pub fn keyids(&self) -> Vec<&str> {
        self.signatures.iter().map(|s| s.keyid.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_published_test_vector() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
        );
        assert_eq!(pae("", b""), b"DSSEv1 0  0 ");
        // Lengths count bytes, not characters.
        assert_eq!(pae("t", "é".as_bytes()), "DSSEv1 1 t 2 é".as_bytes());
    }

    #[test]
    fn envelope_round_trips_and_verifies() {
        let key = SigningKey::generate("alice");
        let other = SigningKey::generate("alice");
        let env = Envelope::sign(IN_TOTO_PAYLOAD, b"{\"a\":1}", &key);
        let line = env.to_line();
        assert!(line.ends_with("}\n") && line.matches('\n').count() == 1);
        assert!(line.starts_with("{\"payload\":\"eyJhIjoxfQ==\",\"payloadType\":\"application/vnd.in-toto+json\",\"signatures\":[{\"keyid\":\"alice\",\"sig\":\""));
        let back = Envelope::parse(&line).unwrap();
        assert_eq!(back, env);
        assert_eq!(back.payload().unwrap(), b"{\"a\":1}");
        // Deterministic: the same payload and key sign to the same bytes.
        assert_eq!(
            Envelope::sign(IN_TOTO_PAYLOAD, b"{\"a\":1}", &key).to_line(),
            line
        );

        let trusted = [other.public(), key.public()];
        let by = back.signed_by(&trusted).unwrap();
        assert_eq!(by.len(), 1);
        assert_eq!(by[0].raw(), key.public().raw());
        // Same keyid, another key: not trusted.
        assert!(back.signed_by(&[other.public()]).unwrap().is_empty());
        // A changed payload or type breaks the signature.
        let mut tampered = back.clone();
        tampered.payload = b64(b"{\"a\":2}");
        assert!(tampered.signed_by(&trusted).unwrap().is_empty());
        let mut retyped = back.clone();
        retyped.payload_type = "application/json".into();
        assert!(retyped.signed_by(&trusted).unwrap().is_empty());
    }

    #[test]
    fn url_safe_and_unpadded_base64_are_accepted() {
        let key = SigningKey::generate("k");
        let mut env = Envelope::sign(IN_TOTO_PAYLOAD, &[0xfb, 0xff], &key);
        assert_eq!(env.payload, "+/8=");
        env.payload = "-_8".into();
        assert_eq!(env.signed_by(&[key.public()]).unwrap().len(), 1);
        assert!(Envelope::parse("{}").is_err());
        assert!(Envelope::parse("not json")
            .unwrap_err()
            .contains("not a DSSE envelope"));
    }
}
