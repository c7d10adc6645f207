"""Programs copied into every sandbox's tools directory (`/opt/corral`) and run there as the
sandbox's user with the distribution's python3 (stdlib only, Python 3.11). `archive` is also the
SDK's local tar reader and writer."""
