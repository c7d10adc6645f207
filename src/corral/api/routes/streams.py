"""Native API routes: streams."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["streams"])
