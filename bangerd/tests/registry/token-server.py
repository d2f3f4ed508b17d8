#!/usr/bin/env python3
"""A registry token service for tests (the Docker/distribution token
protocol): GET /token?service=S&scope=repository:NAME:ACTIONS with HTTP
basic auth. The right username and password get a JWT (RS256, signed by
`openssl dgst` with the given key, its certificate in the x5c header so
docker-registry checks it against its rootcertbundle) granting the
actions asked for; anything else gets 401. Listens on 127.0.0.1:PORT.

Each request is appended to LOG as a JSON line {"user", "granted",
"scope"}; passwords are never logged.

usage: token-server.py PORT KEY CERT ISSUER USER PASSWORD LOG
"""

import base64
import http.server
import json
import os
import subprocess
import sys
import time
import urllib.parse

port, key, cert, issuer, user, password, log = sys.argv[1:8]
der = subprocess.run(
    ["openssl", "x509", "-in", cert, "-outform", "DER"],
    check=True,
    capture_output=True,
).stdout


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(claims: dict) -> str:
    header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(der).decode()]}
    signing_input = (
        b64url(json.dumps(header).encode()) + "." + b64url(json.dumps(claims).encode())
    )
    signature = subprocess.run(
        ["openssl", "dgst", "-sha256", "-sign", key],
        input=signing_input.encode(),
        check=True,
        capture_output=True,
    ).stdout
    return signing_input + "." + b64url(signature)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status: int, body: dict):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        if url.path != "/token":
            self.reply(404, {"errors": [{"code": "NOT_FOUND"}]})
            return
        query = urllib.parse.parse_qs(url.query)
        scopes = query.get("scope", [])
        who, secret = None, None
        auth = self.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                who, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except ValueError:
                pass
        granted = who == user and secret == password
        with open(log, "a") as f:
            f.write(json.dumps({"user": who, "granted": granted, "scope": scopes}) + "\n")
        if not granted:
            self.reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]})
            return
        access = []
        for scope in scopes:
            parts = scope.split(":")
            if len(parts) >= 3:
                access.append(
                    {
                        "type": parts[0],
                        "name": ":".join(parts[1:-1]),
                        "actions": parts[-1].split(","),
                    }
                )
        now = int(time.time())
        token = sign(
            {
                "iss": issuer,
                "sub": who,
                "aud": query.get("service", [""])[0],
                "exp": now + 300,
                "nbf": now - 10,
                "iat": now,
                "jti": os.urandom(8).hex(),
                "access": access,
            }
        )
        self.reply(200, {"token": token, "access_token": token, "expires_in": 300})


http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()
