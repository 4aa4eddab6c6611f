# Ember's agent images. Run from the repository root (relative paths here are relative to it):
#   docker buildx bake -f edge_images/docker/docker-bake.hcl --print      # what would be built
#   docker buildx bake -f edge_images/docker/docker-bake.hcl              # the multi-arch agent
#   IMAGE=registry.lan/ember/agent TAG=0.1.0 \
#     docker buildx bake -f edge_images/docker/docker-bake.hcl --push agent
#   docker buildx bake -f edge_images/docker/docker-bake.hcl agent-jetson # JetPack 6, arm64

variable "IMAGE" {
  default = "ember-agent"
}

variable "TAG" {
  default = "latest"
}

group "default" {
  targets = ["agent"]
}

# python:3.11-slim, the agent with onnxruntime's CPU wheels, non-root, for x86 gateways and
# 64-bit Raspberry Pi OS hosts that run containers.
target "agent" {
  context    = "."
  dockerfile = "edge_images/docker/Dockerfile"
  platforms  = ["linux/amd64", "linux/arm64"]
  tags       = ["${IMAGE}:${TAG}"]
  args = {
    PYTHON_VERSION = "3.11"
    EXTRAS         = ""
  }
  labels = {
    "org.opencontainers.image.title"       = "ember-agent"
    "org.opencontainers.image.description" = "Ember federated learning edge agent"
    "org.opencontainers.image.licenses"    = "Apache-2.0"
  }
}

# JetPack 6 (L4T r36, Ubuntu 22.04, Python 3.10) with onnxruntime-gpu from NVIDIA's Jetson index.
target "agent-jetson" {
  context    = "."
  dockerfile = "edge_images/jetson/Dockerfile"
  platforms  = ["linux/arm64"]
  tags       = ["${IMAGE}-jetson:${TAG}"]
  args = {
    L4T_TAG       = "r36.4.0"
    TORCH_VERSION = ""
  }
}
