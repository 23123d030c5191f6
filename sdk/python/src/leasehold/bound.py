"""Check a leasehold token bound to its workload's key, at a resource server.

A token leased for a role with `require_binding = true` (or for any token
role when the request proved a key) carries a confirmation claim `cnf`
(RFC 7800): `jkt`, the thumbprint of the workload's DPoP key (RFC 9449), or
`x5t#S256`, the thumbprint of its TLS client certificate (RFC 8705). Such a
token is worth nothing without that key: with every use, the workload must
send a fresh DPoP proof signed by the key (header `DPoP`, and
`Authorization: DPoP <token>`), or call over mutual TLS with the
certificate. This module is what a resource server runs:

    claims = verify_request(token, jwks, "GET", "https://api.example/doc/1",
                            dpop_proof=request.headers.get("DPoP"),
                            client_cert_der=tls_peer_certificate_der,
                            seen=replay_cache)

1. the token's signature against the broker's keys (`GET
   /.well-known/jwks.json`), its `iss`/`aud` if given, and its time claims;
2. for `cnf.jkt`: the proof is a `dpop+jwt` signed by the key in its own
   header, for this method and URL, recent, unused (`jti`), hashing this
   token (`ath`), and its key's thumbprint is `cnf.jkt`;
3. for `cnf["x5t#S256"]`: the client certificate's SHA-256 is it.

Signatures and expiry are checked offline. A lease revoked early is seen
only through the broker's introspection (`POST /v1/introspect`, which also
returns `cnf`): call it where an early revocation must take effect at once.

Needs `cryptography` (`pip install 'leasehold[bound]'`). Run as a program
(`python -m leasehold.bound --help`), it checks one request and prints the
claims (exit 0) or why it was refused (exit 1).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
import time
from typing import Any, Callable, Optional

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

__all__ = ["Refused", "ReplayCache", "verify_request", "verify_token", "verify_dpop", "thumbprint"]

PROOF_MAX_AGE = 60
LEEWAY = 5


class Refused(Exception):
    """The request must be refused (401); the message says why."""


class ReplayCache:
    """DPoP proof ids seen within the window (one resource server process)."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}

    def use(self, key: str, until: float, now: float) -> None:
        for k in [k for k, t in self._seen.items() if t < now]:
            del self._seen[k]
        if key in self._seen:
            raise Refused("the DPoP proof was already used")
        self._seen[key] = until


def _b64d(s: str) -> bytes:
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def _b64e(b: bytes) -> str:
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def _int(s: str) -> int:
    return int.from_bytes(_b64d(s), "big")


_EC: dict[str, tuple[Callable[[], ec.EllipticCurve], Callable[[], hashes.HashAlgorithm], str, int]] = {
    "P-256": (ec.SECP256R1, hashes.SHA256, "ES256", 32),
    "P-384": (ec.SECP384R1, hashes.SHA384, "ES384", 48),
}
_RSA: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "RS256": hashes.SHA256, "RS384": hashes.SHA384, "RS512": hashes.SHA512,
    "PS256": hashes.SHA256, "PS384": hashes.SHA384, "PS512": hashes.SHA512,
}


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638: base64url SHA-256 of the key's required members, sorted."""
    members = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "RSA": ("e", "kty", "n")}
    kty = jwk.get("kty")
    if kty not in members:
        raise Refused("unsupported key type")
    canonical = json.dumps({m: jwk[m] for m in members[kty]}, separators=(",", ":"), sort_keys=True)
    return _b64e(hashlib.sha256(canonical.encode()).digest())


def _verify_jws(token: str, jwk: dict[str, Any], alg: str) -> None:
    """Check a compact JWS's signature with a public JWK under `alg`."""
    try:
        h, c, s = token.split(".")
    except ValueError:
        raise Refused("not a compact JWS") from None
    message, sig = f"{h}.{c}".encode(), _b64d(s)
    if any(m in jwk for m in ("d", "p", "q", "dp", "dq", "qi", "k")):
        raise Refused("a key with private members")
    kty = jwk.get("kty")
    try:
        if kty == "OKP" and jwk.get("crv") == "Ed25519" and alg == "EdDSA":
            ed25519.Ed25519PublicKey.from_public_bytes(_b64d(jwk["x"])).verify(sig, message)
        elif kty == "EC" and jwk.get("crv") in _EC and _EC[jwk["crv"]][2] == alg:
            curve, digest, _, size = _EC[jwk["crv"]]
            if len(sig) != 2 * size:
                raise Refused("malformed signature")
            ec_key = ec.EllipticCurvePublicNumbers(_int(jwk["x"]), _int(jwk["y"]), curve()).public_key()
            der = encode_dss_signature(int.from_bytes(sig[:size], "big"), int.from_bytes(sig[size:], "big"))
            ec_key.verify(der, message, ec.ECDSA(digest()))
        elif kty == "RSA" and alg in _RSA:
            rsa_key = rsa.RSAPublicNumbers(_int(jwk["e"]), _int(jwk["n"])).public_key()
            pad: padding.AsymmetricPadding = (
                padding.PSS(mgf=padding.MGF1(_RSA[alg]()), salt_length=padding.PSS.DIGEST_LENGTH)
                if alg.startswith("PS") else padding.PKCS1v15())
            rsa_key.verify(sig, message, pad, _RSA[alg]())
        else:
            raise Refused(f"algorithm {alg!r} does not fit the key")
    except InvalidSignature:
        raise Refused("bad signature") from None
    except (KeyError, ValueError):
        raise Refused("unusable key") from None


def _segments(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        h, c, _ = token.split(".")
        header, claims = json.loads(_b64d(h)), json.loads(_b64d(c))
    except ValueError:
        raise Refused("not a JWT") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise Refused("not a JWT")
    return header, claims


def verify_token(token: str, jwks: dict[str, Any], issuer: Optional[str] = None,
                 audience: Optional[str] = None, now: Optional[float] = None) -> dict[str, Any]:
    """The claims of a token signed by one of the broker's keys, if current."""
    now = time.time() if now is None else now
    header, claims = _segments(token)
    keys = [k for k in jwks.get("keys", []) if k.get("kid") == header.get("kid")]
    if len(keys) != 1:
        raise Refused("no key of the broker matches the token")
    _verify_jws(token, keys[0], header.get("alg", ""))
    if issuer is not None and claims.get("iss") != issuer:
        raise Refused("issuer mismatch")
    if audience is not None and claims.get("aud") != audience:
        raise Refused("audience mismatch")
    if not isinstance(claims.get("exp"), int) or now >= claims["exp"]:
        raise Refused("the token has expired")
    if isinstance(claims.get("nbf"), int) and claims["nbf"] > now + LEEWAY:
        raise Refused("the token is not valid yet")
    return claims


def _normalize(url: str) -> str:
    url = url.split("#")[0].split("?")[0]
    scheme, _, rest = url.partition("://")
    scheme = scheme.lower()
    authority, slash, path = rest.partition("/")
    authority = authority.lower()
    default = {"https": ":443", "http": ":80"}.get(scheme)
    if default is None or not authority:
        raise Refused("not an http(s) URL")
    if authority.endswith(default):
        authority = authority[: -len(default)]
    return f"{scheme}://{authority}/{path}"


def verify_dpop(proof: str, method: str, url: str, access_token: str,
                seen: ReplayCache, now: Optional[float] = None) -> str:
    """Check a DPoP proof for this request and token; its key's thumbprint."""
    now = time.time() if now is None else now
    header, claims = _segments(proof)
    if header.get("typ") != "dpop+jwt":
        raise Refused("the proof's typ is not dpop+jwt")
    jwk = header.get("jwk")
    if not isinstance(jwk, dict):
        raise Refused("the proof carries no jwk")
    _verify_jws(proof, jwk, header.get("alg", ""))
    if claims.get("htm") != method:
        raise Refused("the proof is for another method")
    if _normalize(str(claims.get("htu", ""))) != _normalize(url):
        raise Refused("the proof is for another URL")
    iat = claims.get("iat")
    if not isinstance(iat, int) or iat > now + LEEWAY or iat < now - PROOF_MAX_AGE - LEEWAY:
        raise Refused("the proof is stale or from the future")
    ath = _b64e(hashlib.sha256(access_token.encode()).digest())
    if claims.get("ath") != ath:
        raise Refused("the proof is not for this token (ath)")
    jti = claims.get("jti")
    if not isinstance(jti, str) or not jti:
        raise Refused("the proof has no jti")
    jkt = thumbprint(jwk)
    seen.use(f"{jkt}:{jti}", iat + PROOF_MAX_AGE + LEEWAY, now)
    return jkt


def verify_request(token: str, jwks: dict[str, Any], method: str, url: str, *,
                   dpop_proof: Optional[str] = None, client_cert_der: Optional[bytes] = None,
                   seen: Optional[ReplayCache] = None, issuer: Optional[str] = None,
                   audience: Optional[str] = None, require_bound: bool = True,
                   now: Optional[float] = None) -> dict[str, Any]:
    """The token's claims if this request may use it; `Refused` otherwise."""
    claims = verify_token(token, jwks, issuer, audience, now)
    cnf = claims.get("cnf")
    if cnf is None:
        if require_bound:
            raise Refused("the token is not bound to a key")
        return claims
    if not isinstance(cnf, dict):
        raise Refused("malformed cnf")
    if "jkt" in cnf:
        if dpop_proof is None:
            raise Refused("the token is bound to a DPoP key: a DPoP proof is required")
        jkt = verify_dpop(dpop_proof, method, url, token, seen or ReplayCache(), now)
        if jkt != cnf["jkt"]:
            raise Refused("the proof's key is not the key the token is bound to")
    elif "x5t#S256" in cnf:
        if client_cert_der is None:
            raise Refused("the token is bound to a client certificate: use mutual TLS")
        if _b64e(hashlib.sha256(client_cert_der).digest()) != cnf["x5t#S256"]:
            raise Refused("the client certificate is not the one the token is bound to")
    else:
        raise Refused("unknown confirmation method")
    return claims


def _main() -> int:
    ap = argparse.ArgumentParser(description="Check one request's use of a bound leasehold token.")
    ap.add_argument("--jwks", required=True, help="the broker's JWKS (GET /.well-known/jwks.json), a file")
    ap.add_argument("--token-file", required=True)
    ap.add_argument("--method", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--dpop-file", help="the request's DPoP header value, a file")
    ap.add_argument("--client-cert", help="the TLS client certificate, PEM")
    ap.add_argument("--issuer")
    ap.add_argument("--audience")
    a = ap.parse_args()
    def read(path: str) -> str:
        with open(path, encoding="ascii") as f:
            return f.read().strip()

    der = None
    if a.client_cert:
        from cryptography import x509
        from cryptography.hazmat.primitives.serialization import Encoding
        with open(a.client_cert, "rb") as f:
            der = x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)
    try:
        claims = verify_request(read(a.token_file), json.loads(read(a.jwks)), a.method, a.url,
                                dpop_proof=read(a.dpop_file) if a.dpop_file else None,
                                client_cert_der=der, issuer=a.issuer, audience=a.audience)
    except Refused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 1
    print(json.dumps(claims))
    return 0


if __name__ == "__main__":
    sys.exit(_main())
