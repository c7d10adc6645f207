"""The web console: pages served at `/console` from files shipped in the package (no CDN), a
token sign-in kept in an HttpOnly cookie, and the native API (`/v1`) called by the pages' own
scripts with that cookie. `session` holds the cookie and its CSRF checks (imported by
`corral.api.auth`, so kept free of route imports); `routes` serves the pages and the sign-in.
"""
