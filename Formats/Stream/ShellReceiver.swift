extension SparseStream {
  /// A POSIX shell script that receives a stream on standard input and writes a sparse raw
  /// file, for hosts without lacuna. It uses `read` (a shell builtin, which takes a pipe one
  /// byte at a time, so it never reads past a header line), `head -c` for DATA (which must
  /// read no more than it is asked: the script checks), `truncate` to leave ZERO runs as
  /// holes, and `mv` to put the file in place once DONE has arrived. DATA is appended at the
  /// end of the file, after `truncate` has extended it over the holes before it, so there is
  /// no offset arithmetic for `dd` and nothing needs alignment.
  ///
  /// It checks the layout (magic, record syntax, sizes that overrun the disk, the DONE
  /// record and that nothing follows it) but not the CRC-32, which would need a CRC tool;
  /// a cut stream always fails, since its DONE record is missing.
  public static func shellReceiver(version: String) -> String {
    let digits = "0" + String(repeating: "[0-9]", count: 19)
    return """
      #!/bin/sh
      # Receives a lacuna stream (LACUNA-STREAM 1) on standard input and writes it as a
      # sparse raw image, on a host without lacuna. Printed by `lacuna stream-receiver`
      # (lacuna \(version)); the format is described in lacuna's Formats/Stream/README.md.
      #
      #   lacuna stream-receiver > receive.sh
      #   lacuna convert -O stream disk.qcow2 - | sh receive.sh disk.img
      #   lacuna convert -O stream disk.qcow2 - | ssh host sh receive.sh disk.img
      #
      # Needs sh, head (one whose -c reads no further than asked, as GNU coreutils' does;
      # checked below), truncate and mv. The image is written as OUTPUT.part and renamed to
      # OUTPUT once the DONE record has arrived; a cut or malformed stream exits 1 and
      # leaves nothing. The CRC-32 in the DONE record is not verified here (lacuna's own
      # receiver, `lacuna convert -f stream - OUTPUT`, does): it is zlib's crc32 of the
      # whole image, so a tool that computes that can compare it by hand.
      set -u
      if [ $# -ne 1 ]; then
        echo "usage: sh receive.sh OUTPUT < STREAM" >&2
        exit 2
      fi
      out=$1
      case $out in -*) out=./$out ;; esac
      part=$out.part
      fail() {
        rm -f "$part"
        echo "receive: $*" >&2
        exit 1
      }
      trap 'rm -f "$part"; exit 1' HUP INT TERM

      # A head that reads ahead on a pipe would swallow the next record's header.
      probe=$(printf 'ab\\n' | { head -c 1 >/dev/null; IFS= read -r rest; echo "$rest"; })
      [ "$probe" = b ] || fail "this system's head -c reads past what it is asked on a pipe; install GNU coreutils' head"

      # number TEXT: sets n to the 20-digit decimal TEXT without its leading zeros.
      number() {
        case $1 in
          \(digits)) ;;
          *) fail "bad number '$1' in a record header (cut or damaged stream)" ;;
        esac
        n=${1#"${1%%[!0]*}"}
        n=${n:-0}
      }

      IFS= read -r line || fail "the input is empty or cut short"
      [ "$line" = "LACUNA-STREAM 1" ] || fail "not a lacuna stream of version 1"
      IFS= read -r line || fail "the stream is cut short after its first line"
      case $line in "SIZE "*) ;; *) fail "the second line is not a SIZE record" ;; esac
      number "${line#SIZE }"
      size=$n
      : >"$part" || fail "cannot create $part"
      pos=0    # bytes of the disk received
      filled=0 # bytes the file holds: DATA is appended at its end
      while :; do
        IFS= read -r line || fail "the stream is cut short at disk offset $pos of $size (no DONE record)"
        case $line in
          "DATA "*|"ZERO "*|"DONE "*) ;;
          *) fail "bad record header at disk offset $pos (cut or damaged stream)" ;;
        esac
        number "${line#???? }"
        case $line in
          DATA*)
            [ "$n" -gt 0 ] && [ "$n" -le $((size - pos)) ] || fail "a DATA record of $n bytes at disk offset $pos does not fit in $size"
            if [ "$filled" -lt "$pos" ]; then truncate -s "$pos" "$part" || fail "cannot extend $part"; fi
            head -c "$n" >>"$part" || fail "cannot write $part"
            pos=$((pos + n))
            filled=$pos
            ;;
          ZERO*)
            [ "$n" -gt 0 ] && [ "$n" -le $((size - pos)) ] || fail "a ZERO record of $n bytes at disk offset $pos does not fit in $size"
            pos=$((pos + n))
            ;;
          DONE*)
            [ "$pos" -eq "$size" ] || fail "DONE at disk offset $pos, before the end of the disk ($size)"
            truncate -s "$size" "$part" || fail "cannot size $part"
            if IFS= read -r extra || [ -n "$extra" ]; then fail "bytes follow the DONE record"; fi
            mv -f "$part" "$out" || fail "cannot rename $part to $out"
            exit 0
            ;;
        esac
      done

      """
  }
}
