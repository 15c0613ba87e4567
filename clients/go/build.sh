#!/bin/sh
# Builds the Go Accounts participant from the contract, with Debian's Go toolchain and packages.
#
#   clients/go/build.sh [OUT_DIR]      (default: clients/go/bin)
#
# Generates the saga.v1 Go code from protos/ with protoc, protoc-gen-go and protoc-gen-go-grpc
# into OUT_DIR/gopath (the generated code is never committed: it must match the grpc-go and
# protobuf versions it is compiled against), runs go vet and the unit tests, and writes the
# binary OUT_DIR/accounts; the sources must be gofmt-formatted. GOPATH mode: the libraries come from Debian's packages under
# /usr/share/gocode, and nothing is downloaded. GOCACHE, when unset, is OUT_DIR/cache.
# With GO_SKIP_TESTS=1 the unit tests are not run.
set -eu

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
out=${1:-$here/bin}
mkdir -p "$out"
out=$(cd "$out" && pwd)

missing=""
for tool in go protoc protoc-gen-go protoc-gen-go-grpc gcc; do
    command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"
done
for dir in google.golang.org/grpc google.golang.org/protobuf google.golang.org/genproto \
    github.com/mattn/go-sqlite3; do
    [ -d "/usr/share/gocode/src/$dir" ] || missing="$missing $dir"
done
if [ -n "$missing" ]; then
    echo "build.sh: missing:$missing" >&2
    echo "install them (as root): apt-get install golang-go golang-google-grpc-dev" \
        "golang-google-protobuf-dev golang-github-golang-protobuf-1-5-dev protoc-gen-go" \
        "protoc-gen-go-grpc protobuf-compiler golang-github-mattn-go-sqlite3-dev gcc" >&2
    exit 2
fi

export GO111MODULE=off GOPROXY=off GOFLAGS= CGO_ENABLED=1
export GOPATH="$out/gopath:/usr/share/gocode"
export GOCACHE="${GOCACHE:-$out/cache}"
src="$out/gopath/src/saga-coordinator"

# Fresh sources each time, so that a file removed here is gone there too.
rm -rf "$src"
mkdir -p "$src/accounts" "$src/sagav1"
cp "$here"/accounts/*.go "$src/accounts/"

# The protos name no go_package (they are the language-neutral contract): M maps the file to
# the import path the participant uses.
mapping=Msaga/v1/participant_service.proto=saga-coordinator/sagav1
protoc -I "$root/protos" \
    --go_out="$out/gopath/src" --go_opt="$mapping" \
    --go-grpc_out="$out/gopath/src" --go-grpc_opt="$mapping" \
    saga/v1/participant_service.proto

unformatted=$(gofmt -l "$here/accounts")
if [ -n "$unformatted" ]; then
    echo "build.sh: not gofmt-formatted (gofmt -w them):" $unformatted >&2
    exit 1
fi

cd "$src"
go vet ./...
if [ "${GO_SKIP_TESTS:-}" != 1 ]; then
    go test -vet=off ./...  # go vet ran above
fi
go build -o "$out/accounts" ./accounts
echo "built $out/accounts"
